"""`benchmarks.gpu_aot`: counting an XLA:GPU program's kernels from its HLO text, and (slow, with
XLA's CUDA plugin from `make gpu-aot-deps`) a deviceless GPU compile of the tiny model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_aot import (
    PLUGIN_SITE,
    by_scope,
    group_counts,
    kernel_counts,
    kernel_list,
    kernel_stats,
    plugin_importable,
    shape_bytes,
    source_scope,
)

ROOT = Path(__file__).resolve().parents[1]

# The shapes of an optimized XLA:GPU module: fusions with their own computations, a cuBLAS
# call, a command buffer (`call`), a loop and a conditional whose bodies launch kernels, a
# stand-alone copy, and instructions that launch nothing.
HLO = """HloModule jit_step, entry_computation_layout={(f32[8,8]{1,0})->f32[8,8]{1,0}}

%fused_add (p0: f32[8,8]) -> f32[8,8] {
  %p0 = f32[8,8]{1,0} parameter(0)
  ROOT %add.1 = f32[8,8]{1,0} add(%p0, %p0), metadata={op_name="jit(f)/add"}
}

%command_buffer (p: f32[8,8]) -> f32[8,8] {
  %p = f32[8,8]{1,0} parameter(0)
  %loop_add_fusion.3 = f32[8,8]{1,0} fusion(%p), kind=kLoop, calls=%fused_add
  ROOT %input_reduce_fusion.7 = f32[8,8]{1,0} fusion(%loop_add_fusion.3), calls=%fused_add
}

%body (t: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %t = (s32[], f32[8,8]{1,0}) parameter(0)
  %x = f32[8,8]{1,0} get-tuple-element(%t), index=1
  %loop_add_fusion.9 = f32[8,8]{1,0} fusion(%x), kind=kLoop, calls=%fused_add, @META
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %tuple.2 = (s32[], f32[8,8]{1,0}) tuple(%i, %loop_add_fusion.9)
}

%cond (t: (s32[], f32[8,8])) -> pred[] {
  %t = (s32[], f32[8,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %c = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%yes (x: f32[8,8]) -> f32[8,8] {
  %x = f32[8,8]{1,0} parameter(0)
  ROOT %loop_select_fusion.1 = f32[8,8]{1,0} fusion(%x), kind=kLoop, calls=%fused_add
}

%no (x: f32[8,8]) -> f32[8,8] {
  ROOT %x = f32[8,8]{1,0} parameter(0)
}

ENTRY %main.5 (a: f32[8,8]) -> f32[8,8] {
  %a = f32[8,8]{1,0} parameter(0)
  %custom-call.24 = (f32[8,8]{1,0}, s8[1024]{0}) custom-call(%a, %a), custom_call_target="gemm"
  %gte = f32[8,8]{1,0} get-tuple-element(%custom-call.24), index=0
  %call.1 = f32[8,8]{1,0} call(%gte), to_apply=%command_buffer
  %z = s32[] constant(0)
  %init = (s32[], f32[8,8]{1,0}) tuple(%z, %call.1)
  %while.2 = (s32[], f32[8,8]{1,0}) while(%init), condition=%cond, body=%body, @TRIPS
  %w = f32[8,8]{1,0} get-tuple-element(%while.2), index=1
  %copy.3 = f32[8,8]{0,1} copy(%w)
  %p = pred[] constant(true)
  %conditional.4 = f32[8,8]{1,0} conditional(%p, %copy.3, %copy.3), branch_computations={%yes, %no}
  ROOT %bc = f32[8,8]{1,0} bitcast(%conditional.4)
}
""".replace("@META", 'metadata={op_type="add" op_name="jit(step)/jvp(encoder)/add" '
           'source_file="a.py"}').replace("@TRIPS", 'backend_config={"known_trip_count":{"n":"4"}}')


def test_kernel_counts_walk_calls_loops_and_branches() -> None:
    """Kernel launches per step: the loop's body and condition (trip count 4) count 4 times."""
    counts = kernel_counts(HLO)
    assert counts == {"custom-call": 1, "loop_add_fusion": 1 + 4, "input_reduce_fusion": 1,
                      "loop_select_fusion": 1, "op:copy": 1, "op:compare": 4}
    groups = group_counts(counts)
    assert groups == {"gemm": 1, "attention": 0, "softmax": 0, "reduce": 1, "transpose": 0,
                      "select": 1, "other": 10}
    once = kernel_counts(re.sub(r', backend_config=\{"known_trip_count"[^\n]*', "", HLO))
    assert once["loop_add_fusion"] == 2 and once["op:compare"] == 1  # no trip count: once
    assert group_counts({"dot_product_attention_bwd": 2, "triton_softmax": 3}) == {
        "gemm": 0, "attention": 2, "softmax": 3, "reduce": 0, "transpose": 0, "select": 0,
        "other": 0}
    with pytest.raises(ValueError, match="no ENTRY computation"):
        kernel_counts(HLO.replace("ENTRY ", ""))


def test_kernel_io_bytes_count_operands_and_results_once() -> None:
    """Each kernel's operand and result arrays, by kind, without the cuBLAS call's scratch
    (s8[1024]); a name repeated in another computation (`%p`: f32[8,8] in the command buffer,
    pred[] in the entry) is looked up in its own."""
    assert shape_bytes("(f32[8,8]{1,0}, s8[1024]{0})") == 256 + 1024
    assert shape_bytes("bf16[3,5]{1,0}") == 30 and shape_bytes("pred[]") == 1
    assert shape_bytes("f8e4m3fn[4]{0}") == 4 and shape_bytes("s32[]") == 4
    counts, io = kernel_stats(HLO)
    assert counts == kernel_counts(HLO)
    assert io == {"custom-call": 256 + 2 * 256, "loop_add_fusion": 512 + 4 * 512,
                  "input_reduce_fusion": 512, "loop_select_fusion": 512, "op:copy": 512,
                  "op:compare": 4 * (1 + 4 + 4)}


def test_dynamic_slices_count_the_slice_not_the_buffer() -> None:
    """A scan's stacked buffers: a dynamic slice reads and writes its slice, an in-place
    dynamic-update-slice reads and writes its update (not the (9, 64, 64) buffer)."""
    hlo = """HloModule m

ENTRY %main (a: f32[9,64,64], u: f32[1,64,64], i: s32[]) -> f32[9,64,64] {
  %a = f32[9,64,64]{2,1,0} parameter(0)
  %u = f32[1,64,64]{2,1,0} parameter(1)
  %i = s32[] parameter(2)
  %loop_dynamic_slice_fusion = f32[1,64,64]{2,1,0} fusion(%a, %i), kind=kLoop, calls=%f
  %loop_add_fusion = f32[1,64,64]{2,1,0} fusion(%loop_dynamic_slice_fusion, %u), calls=%f
  ROOT %loop_dynamic_update_slice_fusion.2 = f32[9,64,64]{2,1,0} fusion(%a, %loop_add_fusion, %i)
}
"""
    _, io = kernel_stats(hlo)
    slice_bytes = 64 * 64 * 4
    assert io == {"loop_dynamic_slice_fusion": 2 * slice_bytes, "loop_add_fusion": 3 * slice_bytes,
                  "loop_dynamic_update_slice_fusion": 2 * (slice_bytes + 4)}


def test_partly_read_fusion_operands() -> None:
    """A fusion operand only static slices read (a flat vector's parts) counts as those slices,
    one another op also reads counts whole; and an elementwise (loop) fusion reads at most one
    element of an operand per element it writes."""
    hlo = """HloModule m

%fused_parts (p0: f32[1000], p1: f32[64], p2: f32[1000]) -> (f32[64], f32[16]) {
  %p0 = f32[1000]{0} parameter(0)
  %p1 = f32[64]{0} parameter(1)
  %p2 = f32[1000]{0} parameter(2)
  %slice.1 = f32[64]{0} slice(%p0), slice={[0:64]}
  %slice.2 = f32[16]{0} slice(%p0), slice={[100:116]}
  %add.1 = f32[64]{0} add(%slice.1, %p1)
  %slice.3 = f32[64]{0} slice(%p2), slice={[0:64]}
  %neg.1 = f32[1000]{0} negate(%p2)
  %slice.4 = f32[64]{0} slice(%neg.1), slice={[0:64]}
  %add.2 = f32[64]{0} add(%add.1, %slice.3)
  %add.3 = f32[64]{0} add(%add.2, %slice.4)
  ROOT %t = (f32[64]{0}, f32[16]{0}) tuple(%add.3, %slice.2)
}

ENTRY %main (a: f32[1000], b: f32[64], c: f32[1000]) -> (f32[64], f32[16]) {
  %a = f32[1000]{0} parameter(0)
  %b = f32[64]{0} parameter(1)
  %c = f32[1000]{0} parameter(2)
  ROOT %input_slice_fusion = (f32[64]{0}, f32[16]{0}) fusion(%a, %b, %c), calls=%fused_parts
}
"""
    (kernel,) = kernel_list(hlo)
    # results 64 + 16 floats; a: its two slices (64 + 16); b: whole (64); c: whole (1000)
    assert kernel["io_bytes"] == 4 * ((64 + 16) + (64 + 16) + 64 + 1000)
    (kernel,) = kernel_list(hlo.replace("%input_slice_fusion", "%loop_slice_fusion"))
    # as a loop fusion, c is capped at the 80 elements written
    assert kernel["io_bytes"] == 4 * ((64 + 16) + (64 + 16) + 64 + 80)
    with_reduce = hlo.replace("%input_slice_fusion", "%loop_add_fusion").replace(
        "  %neg.1", "  %r.1 = f32[] reduce(%p2, %p1), dimensions={0}, to_apply=%sum\n  %neg.1")
    (kernel,) = kernel_list(with_reduce)
    assert kernel["io_bytes"] == 4 * ((64 + 16) + (64 + 16) + 64 + 1000)  # a reduce inside


def test_kernel_list_in_launch_order_with_source_ops() -> None:
    """Per kernel: name, kind, I/O bytes, result type and the JAX op of its metadata; the
    kinds and bytes add up to `kernel_stats`."""
    ks = kernel_list(HLO)
    assert [k["name"] for k in ks] == [  # the loop's condition, then its body
        "custom-call.24", "loop_add_fusion.3", "input_reduce_fusion.7", "lt",
        "loop_add_fusion.9", "copy.3", "loop_select_fusion.1"]
    by_name = {k["name"]: k for k in ks}
    assert by_name["custom-call.24"]["io_bytes"] == 3 * 256
    assert by_name["custom-call.24"]["type"] == "(f32[8,8]{1,0})"  # no scratch
    assert by_name["loop_add_fusion.9"]["op_name"] == "jit(step)/jvp(encoder)/add"
    assert by_name["loop_add_fusion.3"]["op_name"] == ""
    assert [k["launches"] for k in ks] == [1, 1, 1, 4, 4, 1, 1]
    counts, io = kernel_stats(HLO)
    assert sum(k["io_bytes"] * k["launches"] for k in ks) == sum(io.values())
    assert sum(k["launches"] for k in ks) == sum(counts.values())


def test_kernels_by_source_scope() -> None:
    """Kernels summed by pass (forward / backward / neither) and the model's first named scopes,
    over a step's launches: a loop body's kernel counts its trip count."""
    fwd = "jit(train_step)/jvp(VIPA)/encoder/backbone.run_stage/layers_2/blocks_1/attn/dot_general"
    bwd = ("jit(train_step)/transpose(jvp(VIPA))/encoder/backbone.run_stage/layers_2/blocks_9/"
           "norm1/jit(_var)/reduce_sum")
    assert source_scope(fwd) == ("forward", "encoder/backbone.run_stage/layers_2")
    assert source_scope(bwd) == ("backward", "encoder/backbone.run_stage/layers_2")
    assert source_scope(bwd, depth=5) == (
        "backward", "encoder/backbone.run_stage/layers_2/blocks_9/norm1")
    assert source_scope("jit(train_step)/jit(_where)/select_n") == ("", "(step) select_n")
    assert source_scope("state.params['encoder']['kernel']") == ("", "(none)")
    assert source_scope("") == ("", "(none)")
    kernels = [{"op_name": fwd, "launches": 9, "io_bytes": 10},
               {"op_name": fwd.replace("blocks_1", "blocks_3"), "launches": 1, "io_bytes": 5},
               {"op_name": bwd, "launches": 2, "io_bytes": 7},
               {"op_name": "", "launches": 1, "io_bytes": 1}]
    assert by_scope(kernels) == [
        {"pass": "forward", "scope": "encoder/backbone.run_stage/layers_2", "kernels": 10,
         "io_bytes": 95},
        {"pass": "backward", "scope": "encoder/backbone.run_stage/layers_2", "kernels": 2,
         "io_bytes": 14},
        {"pass": "", "scope": "(none)", "kernels": 1, "io_bytes": 1}]
    ks = kernel_list(HLO)  # the fixture: one source op, in a loop run 4 times
    assert {(r["pass"], r["scope"]): r["kernels"] for r in by_scope(ks)} == {
        ("", "(none)"): 9, ("forward", "(step) add"): 4}


def _plugin_env() -> dict[str, str] | None:
    if plugin_importable() or os.path.isdir(PLUGIN_SITE):
        return dict(os.environ)  # gpu_aot restarts itself with it
    return None


@pytest.mark.slow
def test_deviceless_gpu_compile_quick(tmp_path: Path) -> None:
    """The tiny model's train step compiled by XLA:GPU for the H200 spec on this CPU machine:
    its kernels and XLA's memory estimate; the fused q/k/v projection launches fewer kernels
    than the separate ones; `auto` picks the GPU's (`compiling_for`); `train.xla_options` holds
    for the variant's program alone."""
    env = _plugin_env()
    if env is None:
        pytest.skip("XLA's CUDA plugin is not installed: `make gpu-aot-deps`")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_aot", "--quick", "--out", str(tmp_path),
         "--variant", "separate:model.swin.qkv_projection=separate",
         "--variant", "fused:model.swin.qkv_projection=fused",
         "--variant", "cublas:train.xla_options=--xla_gpu_enable_triton_gemm=false",
         "--variant", "split:train.split_update=True",
         "--dump-hlo", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("gpu_aot-*-h200-bfloat16-b2.json")
    res = json.loads(path.read_text())
    assert res["device_kind"] == "NVIDIA H200" and res["reference"] == "base"
    v = res["variants"]
    for name in ("base", "separate", "fused", "cublas"):
        assert "error" not in v[name], v[name]
        assert v[name]["kernels"] > 100 and v[name]["memory_gib"] > 0
        assert v[name]["kernel_groups"]["gemm"] > 10
        assert v[name]["io_bytes"] == sum(v[name]["io_bytes_by_kind"].values()) > 0
        assert v[name]["io_ms"] == pytest.approx(v[name]["io_bytes"] / 4.8e12 * 1e3)
        top = v[name]["top_io_kernels"]  # the heaviest kernels, heaviest first, with sources
        assert len(top) == 25 and top[0]["io_bytes"] >= top[-1]["io_bytes"] > 0
        assert any(k["op_name"].startswith("jit(") for k in top)
        scopes = v[name]["kernels_by_scope"]  # most launches first, a part of all of them
        assert scopes[0]["kernels"] >= scopes[-1]["kernels"] > 0
        assert sum(r["kernels"] for r in scopes) <= v[name]["kernels"]
        assert {r["pass"] for r in scopes} >= {"forward", "backward"}
        hlo = (tmp_path / f"{name}.hlo.txt").read_text()  # --dump-hlo
        assert sum(k["io_bytes"] for k in kernel_list(hlo)) == v[name]["io_bytes"]
    assert v["base"]["kernels"] == v["fused"]["kernels"]  # auto = the GPU's form
    assert v["fused"]["kernels"] < v["separate"]["kernels"]
    # `train.xla_options` reaches the step's compile: no Triton GEMM fusions, all cuBLAS
    triton = {n: sum(c for k, c in v[n]["kernels_by_kind"].items() if k.startswith("gemm_fusion"))
              for n in ("base", "cublas")}
    assert triton["base"] > 10 and triton["cublas"] == 0, triton
    # `train.split_update`: the gradients' and the update's programs, compiled at once, counted
    # together: the same GEMMs, a few more launches, and more kernel I/O, not less (the
    # gradients are written by one program and read by the other: 60.0 -> 64.9 MB for this
    # tiny model, +0.8% for the paper model)
    split, base = v["split"], v["base"]
    assert "error" not in split and set(split["program_compile_s"]) == {"grads", "apply"}
    assert split["compile_s"] >= max(split["program_compile_s"].values()) > 0
    assert split["kernel_groups"]["gemm"] == base["kernel_groups"]["gemm"]
    assert base["kernels"] <= split["kernels"] < 1.2 * base["kernels"]
    assert base["io_bytes"] < split["io_bytes"] < 1.1 * base["io_bytes"]
    assert 0 < split["memory_gib"] <= base["memory_gib"] * 1.05


def test_results_markdown_lists_the_newest_gpu_aot_run(tmp_path: Path) -> None:
    """RESULTS.md's section: the newest non-quick result per (target, dtype, batch, remat, set
    of variants), kernels relative to the reference, and an error row for a variant that did
    not compile."""
    from benchmarks.run import _md_gpu_aot

    def result(time: str, kernels: int, quick: bool = False) -> dict:
        groups = {"gemm": 10, "softmax": 0, "reduce": 20, "transpose": 5, "select": 3,
                  "other": 7}
        return {
            "benchmark": "gpu_aot", "quick": quick, "target": "h200", "dtype": "bfloat16",
            "batch": 16, "remat": False, "config": "refcoco", "device_kind": "NVIDIA H200",
            "reference": "base", "machine_info": {"time_utc": time, "git_commit": "abc1234"},
            "variants": {
                "base": {"overrides": {}, "kernels": kernels, "kernel_groups": groups,
                         "memory_gib": 24.25, "io_bytes": 187.7e9, "io_ms": 39.104},
                "fewer": {"overrides": {"model.x": "y"}, "kernels": kernels - 45,
                          "kernel_groups": groups, "memory_gib": 23.5},
                "cudnn": {"overrides": {"model.swin.attention_impl": "cudnn"},
                          "error": "XlaRuntimeError: no cuDNN"},
            },
        }

    assert _md_gpu_aot(str(tmp_path)) == []
    for name, r in (("old", result("2026-12-01T00:00:00Z", 6000)),
                    ("new", result("2026-12-04T00:00:00Z", 5945)),
                    ("quick", result("2026-12-05T00:00:00Z", 99, quick=True))):
        (tmp_path / f"gpu_aot-{name}.json").write_text(json.dumps(r))
    text = "\n".join(_md_gpu_aot(str(tmp_path)))
    assert "`benchmarks/results/gpu_aot-new.json`" in text and "gpu_aot-old" not in text
    assert "XLA_FLAGS" not in text
    assert "| base | - | 5945 | +0 | 10 | 0 | 0 | 20 | 5 | 187.7 GB (39.1 ms) | 24.2 GiB |" in text
    assert "| fewer | model.x=y | 5900 | -45 | 10 | 0 | 0 | 20 | 5 | - | 23.5 GiB |" in text
    assert "| cudnn | model.swin.attention_impl=cudnn | error: XlaRuntimeError: no cuDNN |" in text
    other = result("2026-12-06T00:00:00Z", 5000)  # newer, other variants: shown beside it
    other["variants"] = {"base": other["variants"]["base"]}
    (tmp_path / "gpu_aot-other.json").write_text(json.dumps(other))
    text = "\n".join(_md_gpu_aot(str(tmp_path)))
    assert "gpu_aot-new.json" in text and "gpu_aot-other.json" in text and "gpu_aot-old" not in text


def test_missing_plugin_or_spec_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without XLA's CUDA plugin the tool says how to install it; an unknown target names the
    specs there are; `--no-base` without variants is a usage error."""
    from benchmarks import gpu_aot

    monkeypatch.setattr(gpu_aot, "plugin_importable", lambda: False)
    monkeypatch.setattr(gpu_aot, "PLUGIN_SITE", "/nonexistent/gpu-aot/site")
    with pytest.raises(SystemExit, match="make gpu-aot-deps"):
        gpu_aot.ensure_plugin([])
    with pytest.raises(SystemExit, match=r"known targets: \['h100', 'h200'\]"):
        gpu_aot.gpu_device("a100")
    with pytest.raises(SystemExit):
        gpu_aot.main(["--no-base"])


def test_spec_bandwidth() -> None:
    """The kernel-I/O time uses the spec's memory bandwidth: the H200's 4.8 TB/s; none, None."""
    from benchmarks.gpu_aot import read_spec, spec_bandwidth

    assert spec_bandwidth(read_spec("h200")) == 4.8e12
    assert spec_bandwidth(read_spec("h100")) > 1e12
    assert spec_bandwidth("gpu_device_info {\n  core_count: 132\n}\n") is None
    with pytest.raises(SystemExit, match="known targets"):
        read_spec("a100")
