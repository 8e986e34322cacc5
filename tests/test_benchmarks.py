"""Smoke tests for the benchmark scripts (tiny configs), so they keep running as the code moves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests._procs import quick_env

ROOT = Path(__file__).resolve().parents[1]


def _check_machine_info(info: dict) -> None:
    for key in ("machine", "node", "processor", "cpu_count", "git_commit", "jax"):
        assert key in info, key
    assert info["cpu_count"] >= 1


def test_common_helpers() -> None:
    from benchmarks import common

    s = common.summarize([3.0, 1.0, 2.0, 4.0, 5.0])
    assert s["median_s"] == 3.0 and s["min_s"] == 1.0 and s["p90_s"] == 5.0 and s["n"] == 5
    t = common.time_calls({"a": lambda: 1, "b": lambda: 2}, iters=3, warmup=1)
    assert set(t) == {"a", "b"} and t["a"]["n"] == 3 and t["b"]["median_s"] >= 0
    table = common.format_table([["x", 1.5, 2000]], ["name", "v", "n"])
    assert "2,000" in table and table.splitlines()[0].startswith("name")


def test_count_macs_matmul_and_conv() -> None:
    import jax
    import jax.numpy as jnp

    from benchmarks import common

    def f(x, w, k):
        y = jnp.einsum("bij,jk->bik", x, w)  # 2*5*7*3 MACs
        z = jax.lax.conv_general_dilated(y[..., None], k, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.lax.scan(lambda c, _: (c @ jnp.ones((3, 3)), None), y, None, length=4)[0], z

    sds = jax.ShapeDtypeStruct
    args = (sds((2, 5, 7), jnp.float32), sds((7, 3), jnp.float32), sds((3, 3, 1, 4), jnp.float32))
    conv = 2 * 5 * 3 * 4 * 9  # out elements x kernel taps x in features
    assert common.count_macs(f, *args) == 2 * 5 * 7 * 3 + conv + 4 * (2 * 5 * 3 * 3)


def _run_module(module: str, out_dir: Path, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--out", str(out_dir), *args],
        cwd=ROOT, env=quick_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out_dir.glob(f"{module.split('.')[-1]}-*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_backbones_quick(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    res = _run_module("benchmarks.backbones", tmp_path)
    _check_machine_info(res["machine_info"])
    assert res["quick"] is True and res["target_ratio"] == 0.8
    names = [r["name"] for r in res["results"]]
    assert names[0].startswith("swin-") and names[1].startswith("bert-")
    for r in res["results"]:
        for side in ("jax", "torch"):
            assert r[side]["median_s"] > 0 and r[side]["p90_s"] >= r[side]["median_s"]
        assert r["jax"]["compile_s"] > 0
        assert r["ratio_ours_over_torch"] > 0 and r["xla_flops"] > 0 and r["macs"] > 0
        assert r["max_abs_diff"] < 1e-3, r  # same weights on both sides


def test_model_quick(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    res = _run_module("benchmarks.model", tmp_path)
    _check_machine_info(res["machine_info"])
    assert res["paper_gflops"] == 431.0 and res["config"] == "synthetic:test"
    parts = ("swin", "bert", "fusion", "advanced_lang", "veg", "decoder")
    for name in (*parts, "total"):
        g = res["gflops"][name]
        assert g["xla"] > 0 and g["gmacs"] > 0 and g["two_x_gmacs"] == pytest.approx(2 * g["gmacs"])
        assert res["params"][name] > 0
    assert res["params"]["total"] == sum(res["params"][p] for p in parts)
    total = res["gflops"]["total"]["gmacs"]
    assert sum(res["gflops"][p]["gmacs"] for p in parts) == pytest.approx(total, rel=1e-6)
    t = res["timing"]
    assert t["vipa_jax"]["median_s"] > 0 and t["torch_swin_bert"]["median_s"] > 0
    assert t["ratio_vipa_over_torch_backbones"] > 0
    assert "closest to the" in res["note"]
    from configs.synthetic import get_config
    from vipa_jax.models.swin import SwinTransformer

    cfg = get_config("test").model
    padding = SwinTransformer.from_config(cfg.swin).window_padding_macs((cfg.image_size,) * 2)
    assert res["swin_window_padding_gmacs"] == pytest.approx(padding / 1e9)


def test_shape_probe_quick(tmp_path: Path) -> None:
    res = _run_module("benchmarks.shape_probe", tmp_path)
    _check_machine_info(res["machine_info"])
    assert res["quick"] is True and res["steps"] == 4
    assert [r["backbone"] for r in res["results"]] == ["swin", "cnn"]
    for r in res["results"]:
        assert [c["step"] for c in r["curve"]] == [2, 4]
        for c in r["curve"]:
            assert 0.0 <= c["val_fg_acc"] <= 1.0 and np.isfinite(c["loss"])
        assert r["s_per_step"] > 0


def test_shape_probe_foreground_accuracy_counts_only_foreground() -> None:
    from vipa_jax.weights.synthetic_swin import foreground_accuracy

    labels = jnp.asarray([[[0, 1], [2, 2]]])  # 3 foreground pixels
    logits = jax.nn.one_hot(jnp.asarray([[[3, 1], [2, 4]]]), 5)  # background wrong: ignored
    assert float(foreground_accuracy(logits, labels)) == pytest.approx(2 / 3)


def test_profile_module_groups() -> None:
    from benchmarks.profile import hlo_op_names, module_group, op_kind, summarize_ops

    fwd = "jit(fwd)/VIPA/encoder/backbone.run_stage/layers_0/blocks_1/attn/dot_general"
    assert module_group(fwd, 2) == "encoder/backbone.run_stage"
    assert module_group("jit(step)/transpose(jvp(VIPA))/decoder/up1_0/Conv_0/conv", 3) == (
        "bwd: decoder/up1_0/Conv_0")
    assert module_group("jit(step)/jvp(VIPA)/veg/jit(_where)/select_n", 2) == "veg/select_n"
    assert module_group("jit(step)/mul", 2) == "mul"
    assert op_kind("ynn_fusion.42") == "ynn_fusion" and op_kind("copy_bitcast_fusion") == (
        "copy_bitcast_fusion")
    hlo = ('  %fusion.3 = f32[2,8]{1,0} fusion(%p), kind=kLoop, metadata={op_type="add" '
           'op_name="jit(f)/M/a/add" source_file="x.py"}\n'
           '  ROOT dot.1 = f32[2,2]{1,0} dot(%a, %b), metadata={op_name="jit(f)/M/b/dot_general"}')
    assert hlo_op_names(hlo) == {"fusion.3": ("f32[2,8]{1,0}", "jit(f)/M/a/add"),
                                 "dot.1": ("f32[2,2]{1,0}", "jit(f)/M/b/dot_general")}
    # XLA's own instructions (no metadata) take their fused computation's root op_name, else
    # count as "(no metadata)"
    hlo2 = ('%fused_transpose.4 (param_0: f32[8,2]) -> f32[2,8] {\n'
            '  %param_0 = f32[8,2]{1,0} parameter(0)\n'
            '  %neg = f32[8,2]{1,0} negate(%param_0), metadata={op_name="jit(f)/M/c/neg"}\n'
            '  ROOT %transpose.2 = f32[2,8]{1,0} transpose(%neg), dimensions={1,0}, '
            'metadata={op_name="jit(f)/M/c/transpose"}\n}\n\n'
            'ENTRY %main.9 (p: f32[8,2]) -> (f32[2,8], f32[8,2]) {\n'
            '  %p = f32[8,2]{1,0} parameter(0)\n'
            '  %input_transpose_fusion.41 = f32[2,8]{1,0} fusion(%p), kind=kInput, '
            'calls=%fused_transpose.4\n'
            '  %copy.7 = f32[8,2]{0,1} copy(%p)\n'
            '  ROOT %tuple.1 = (f32[2,8]{1,0}, f32[8,2]{0,1}) tuple(%input_transpose_fusion.41, '
            '%copy.7)\n}\n')
    names = hlo_op_names(hlo2)
    assert names["input_transpose_fusion.41"] == ("f32[2,8]{1,0}", "jit(f)/M/c/transpose")
    assert names["copy.7"] == ("f32[8,2]{0,1}", "(no metadata)")
    assert names["neg"][1] == "jit(f)/M/c/neg" and names["p"][1] == "(no metadata)"
    assert module_group(names["input_transpose_fusion.41"][1], 1) == "c"
    ops = {"fusion.3": {"ns": 3e6, "count": 1, "shape": "", "op_name": "jit(f)/M/a/add"},
           "fusion.4": {"ns": 1e6, "count": 1, "shape": "", "op_name": "jit(f)/M/a/mul"},
           "dot.1": {"ns": 4e6, "count": 1, "shape": "", "op_name": "jit(f)/M/b/dot_general"}}
    s = summarize_ops(ops, depth=1)
    assert s["op_time_ms"] == pytest.approx(8.0)
    rows = [(r["name"], r["ms"], r["ops"]) for r in s["by_module"]]
    assert rows == [("a", 4.0, 2), ("b", 4.0, 1)]
    assert s["by_kind"][0] == {"name": "fusion", "ms": 4.0, "percent": 50.0, "ops": 2}
    assert s["top_ops"][0]["name"] == "dot.1" and s["top_ops"][0]["module"] == "b/dot_general"


def test_profile_event_to_instruction() -> None:
    """A trace event names its instruction by its `hlo_op` stat (GPU: cuDNN / cuBLAS kernels
    are named after the library kernel), else by its name, which on a GPU is the instruction's
    with `.` -> `_`."""
    from types import SimpleNamespace

    from benchmarks.profile import _event_op, _sanitized

    cudnn = SimpleNamespace(name="sm90_xmma_fprop_implicit_gemm_bf16",
                            stats=[("correlation_id", 7), ("hlo_op", "cudnn-conv.14")])
    assert _event_op(cudnn) == "cudnn-conv.14"
    assert _event_op(SimpleNamespace(name="%ynn_fusion.3", stats=[])) == "ynn_fusion.3"
    annotated = SimpleNamespace(name="cutlass_80_tensorop_bf16_s16816gemm", stats=[
        ("annotation", "jit_fwd/dot:#hlo_op=custom-call.24,hlo_module=jit_fwd,program_id=3#")])
    assert _event_op(annotated) == "custom-call.24"
    names = ["loop_add_fusion.12", "cudnn-conv.14", "gemm_fusion_dot.857"]
    alias = {_sanitized(n): n for n in names}
    assert alias["loop_add_fusion_12"] == "loop_add_fusion.12"
    assert alias["cudnn_conv_14"] == "cudnn-conv.14"
    assert "loop_add_fusion_1" not in alias  # no prefix matches


def test_part_setup_runs_each_part_alone() -> None:
    """`benchmarks.profile --part`'s inputs: every part of the tiny model's forward runs on its
    own with random inputs of the full forward's shapes, and gives what the full forward's
    pieces give; an unknown part is an error naming the choices."""
    from benchmarks.model import FORWARD_PARTS, part_functions, part_setup
    from configs import synthetic
    from vipa_jax.models.vipa import build_model

    cfg = synthetic.get_config("test").model
    assert set(part_functions(build_model(cfg), cfg)) == set(FORWARD_PARTS)
    fn, args = part_setup(cfg, "swin")
    assert args[1].shape == (1, cfg.image_size, cfg.image_size, 3)
    feats = jax.jit(fn)(*args)
    assert len(feats) == 4 and feats[0].shape[:3] == (1, cfg.image_size // 4, cfg.image_size // 4)
    fn, args = part_setup(cfg, "decoder", variables=args[0])
    assert len(args[1]) == 4 and args[3].dtype == jnp.bool_ and bool(args[3].all())
    logits = np.asarray(jax.jit(fn)(*args))
    assert logits.shape == (1, cfg.image_size, cfg.image_size) and np.isfinite(logits).all()
    assert logits.std() > 0
    with pytest.raises(ValueError, match="part must be one of"):
        part_setup(cfg, "fusion")


def test_profile_quick(tmp_path: Path) -> None:
    """The profiler on the tiny model: the trace is read back and the ops land in the modules."""
    res = _run_module("benchmarks.profile", tmp_path, "--reps", "2")
    _check_machine_info(res["machine_info"])
    assert res["mode"] == "inference" and res["config"] == "synthetic:test" and res["quick"]
    assert res["ops_traced"] >= len(res["top_ops"]) > 0
    assert res["op_time_ms"] > 0 and res["wall_median_ms"] > 0
    groups = {r["name"].split("/")[0] for r in res["by_module"]}
    assert {"encoder", "decoder", "veg"} <= groups, groups
    assert sum(r["ms"] for r in res["by_module"]) == pytest.approx(res["op_time_ms"], rel=1e-6)
    # the Swin stages do most of the encoder's work even in the tiny model
    assert any(r["name"] == "encoder/backbone.run_stage" for r in res["by_module"])


XLA_TIMER_LOG = """\
I1204 23:38:13.1 9968 hlo_pass_pipeline.cc:303] Running HLO pass pipeline on module jit_step: opt
I1204 23:38:13.2 9968 hlo_pass_pipeline.cc:181]   HLO pass algsimp
I1204 23:38:13.3 9968 hlo_pass_pipeline.cc:176] HLO pass: algsimp time: 250 us (250 us) (cumulati
I1204 23:38:13.3 9968 hlo_pass_pipeline.cc:181]   HLO pass simp
I1204 23:38:13.3 9968 hlo_pass_pipeline.cc:303] Running HLO pass pipeline on module jit_step: simp
I1204 23:38:13.3 9968 hlo_pass_pipeline.cc:181]   HLO pass cse
I1204 23:38:13.4 9968 hlo_pass_pipeline.cc:176] HLO pass: cse time: 1.5 ms (1500 us) (cumulative
I1204 23:38:13.4 9968 hlo_pass_pipeline.cc:181]   HLO pass dce
I1204 23:38:13.4 9968 hlo_pass_pipeline.cc:176] HLO pass: dce time: 500 us (500 us) (cumulative
I1204 23:38:13.4 9968 hlo_pass_pipeline.cc:176] HLO pass: simp time: 2.1 ms (2100 us) (cumulativ
I1204 23:38:13.4 9968 hlo_pass_pipeline.cc:181]   HLO pass algsimp
I1204 23:38:13.4 9968 hlo_pass_pipeline.cc:176] HLO pass: algsimp time: 750 us (750 us) (cumulati
I1204 23:38:13.7 9968 hlo_pass_pipeline.cc:303] Running HLO pass pipeline on module jit_step: fusion
I1204 23:38:13.7 9968 hlo_pass_pipeline.cc:181]   HLO pass priority-fusion
I1204 23:38:13.8 9968 hlo_pass_pipeline.cc:303] Running HLO pass pipeline on module fused.7: nested
I1204 23:38:13.8 9968 hlo_pass_pipeline.cc:181]   HLO pass algsimp
I1204 23:38:13.8 7001 hlo_pass_pipeline.cc:303] Running HLO pass pipeline on module cand.3: tune
I1204 23:38:13.8 7001 hlo_pass_pipeline.cc:181]   HLO pass algsimp
I1204 23:38:13.8 9968 hlo_pass_pipeline.cc:176] HLO pass: algsimp time: 2 s (2000000 us) (cumul
I1204 23:38:13.8 7001 hlo_pass_pipeline.cc:176] HLO pass: algsimp time: 5 ms (5000 us) (cumul
I1204 23:38:13.9 9968 hlo_pass_pipeline.cc:176] HLO pass: priority-fusion time: 1.02 min (6119942
I1204 23:39:23.3 9968 gpu_compiler.cc:2152] GpuCompiler::RunHloPasses for jit_step time: 1.17 min (
I1204 23:39:23.4 9968 cpu_compiler.cc:2094] Compiling [jit_other] for CPU using JIT time: 29 ms (28
I1204 23:39:23.5 9968 cpu_compiler.cc:1215] CpuCompiler - Running LLVM verifier time: 10 us (10
not a log line: HLO pass: algsimp time: 9 s (9000000 us)
I1204 23:40:23.4 9968 gpu_compiler.cc:2817] GpuCompiler::RunBackend for jit_step time: 2 s (2000
I1204 23:40:24.0 9968 hlo_pass_pipeline.cc:303] Running HLO pass pipeline on module jit_step: opt
I1204 23:40:24.1 9968 hlo_pass_pipeline.cc:181]   HLO pass cse
I1204 23:40:24.1 9968 hlo_pass_pipeline.cc:176] HLO pass: cse time: 3 ms (3000 us) (cumulative
I1204 23:40:25.4 9968 gpu_compiler.cc:2817] GpuCompiler::RunBackend for jit_step time: 4 s (4000
"""


def test_compile_phases_parses_xla_timers() -> None:
    """Pass times per module and pipeline: a pipeline run as a pass counts by its own passes,
    once; a module compiled inside a pass (or on another thread) counts apart; phases by timer
    label with the module named in it; a program compiled twice as two entries; units from ns
    to min."""
    from benchmarks.compile_phases import parse_log, pick, seconds

    mods = parse_log(XLA_TIMER_LOG.splitlines())
    assert list(mods) == ["jit_step", "fused.7", "cand.3", "jit_other", "jit_step#2"]
    step = mods["jit_step"]
    assert step.passes == {"algsimp": pytest.approx(1e-3), "cse": pytest.approx(1.5e-3),
                           "dce": pytest.approx(5e-4), "priority-fusion": pytest.approx(61.2)}
    assert step.pipelines == {"opt": pytest.approx(1e-3), "simp": pytest.approx(2e-3),
                              "fusion": pytest.approx(61.2)}
    assert step.pass_runs == 5 and step.pass_total == pytest.approx(61.203)
    # a timer that names no module is the current one's (this thread's): the verifier
    assert step.phases == {"GpuCompiler::RunHloPasses for <module>": pytest.approx(70.2),
                           "CpuCompiler - Running LLVM verifier": pytest.approx(1e-5),
                           "GpuCompiler::RunBackend for <module>": 2.0}
    # the same program compiled again, after its backend phase: a second entry
    again = mods["jit_step#2"]
    assert again.passes == {"cse": 3e-3} and again.phases == {
        "GpuCompiler::RunBackend for <module>": 4.0}
    assert mods["fused.7"].passes == {"algsimp": 2.0}
    assert mods["fused.7"].pipelines == {"nested": 2.0}
    assert mods["cand.3"].passes == {"algsimp": 5e-3}
    assert mods["jit_other"].phases == {"Compiling [<module>] for CPU using JIT": 0.029}
    assert mods["jit_other"].passes == {}
    assert pick(mods, None) == ["jit_step"] and pick(mods, "fused") == ["fused.7"]
    assert pick(mods, "jit_step") == ["jit_step", "jit_step#2"]
    with pytest.raises(ValueError, match="no compiled module's name contains 'nope'"):
        pick(mods, "nope")
    assert seconds("3", "ns") == pytest.approx(3e-9)
    with pytest.raises(ValueError, match="unknown time unit 'fortnight'"):
        seconds("1", "fortnight")


def test_compile_phases_runs_a_command_on_cpu(tmp_path: Path) -> None:
    """The wrapper runs a JAX program with XLA's timers on and reports its module: XLA:CPU's
    "Running HLO passes" phase is at least the sum of the passes it logged. The wrapper itself
    starts no JAX backend."""
    prog = ("import sys, jax, jax.numpy as jnp\n"
            "print('probe: not an XLA line', file=sys.stderr)\n"
            "def probe_fn(x):\n    return jnp.tanh(x @ x.T).sum()\n"
            "print(jax.jit(probe_fn)(jnp.ones((32, 32))))\n")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_phases", "--module", "jit_probe_fn", "--out",
         str(tmp_path), "--tag", "t", "--log-out", str(tmp_path / "xla.log"), "--",
         sys.executable, "-c", prog],
        cwd=ROOT, env=quick_env(JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (path,) = tmp_path.glob("compile_phases-*-t.json")
    res = json.loads(path.read_text())
    mod = res["modules"]["jit_probe_fn"]
    hlo_phase = mod["phases_s"]["Running HLO passes on [<module>] for CPU"]
    assert 0 < mod["pass_total_s"] <= hlo_phase and mod["pass_runs"] > 20
    assert "== jit_probe_fn:" in proc.stdout and res["log"] == str(tmp_path / "xla.log")
    # the wrapper records versions without starting a JAX backend (a GPU's memory is the
    # command's); no GPU here
    assert res["machine_info"]["jax"] and "jax_devices" not in res["machine_info"]
    assert res["gpu"] is None
    # the command's own stderr passes through; XLA's info lines only go to the log
    assert "probe: not an XLA line" in proc.stderr and "HLO pass:" not in proc.stderr
    log = Path(res["log"]).read_text()
    assert "probe: not an XLA line" in log and "HLO pass:" in log


def test_results_markdown_shows_compile_phases(tmp_path: Path) -> None:
    """RESULTS.md's compile-phase table: one row per program, its phases and slowest passes."""
    from benchmarks.common import write_result
    from benchmarks.compile_phases import parse_log
    from benchmarks.run import _md_compile_phases

    mods = parse_log(XLA_TIMER_LOG.splitlines())
    write_result("compile_phases", {"command": ["python", "-m", "x"], "log": "l", "exit_status": 0,
                                    "modules": {n: mods[n].as_dict(2) for n in ("jit_step",
                                                                                "jit_step#2")}},
                 str(tmp_path), "t")
    lines = _md_compile_phases(str(tmp_path))
    assert lines[0] == "## XLA compile time by phase"
    rows = [x for x in lines if x.startswith("| jit_step")]
    assert rows == [
        "| jit_step | GpuCompiler::RunHloPasses 70.2 s, GpuCompiler::RunBackend 2.0 s | 61.2 s "
        "(5 runs) | priority-fusion 61.2 s, cse 0.0 s |",
        "| jit_step#2 | GpuCompiler::RunBackend 4.0 s | 0.0 s (1 runs) | cse 0.0 s |"]
    assert any(x.startswith("`python -m x` on ") for x in lines)
    assert _md_compile_phases(str(tmp_path / "none")) == []


def test_compile_phases_reports_a_command_that_cannot_start(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_phases", "--out", str(tmp_path), "--log-out",
         str(tmp_path / "x.log"), "--", str(tmp_path / "no-such-program")], cwd=ROOT,
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 127
    assert "compile_phases: cannot run" in proc.stderr and "no-such-program" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_compile_phases_stops_its_command_on_sigterm(tmp_path: Path) -> None:
    """A SIGTERM to the wrapper (the device suite's time limit) stops the command it runs."""
    import os
    import signal
    import time

    pid_file = tmp_path / "child.pid"
    prog = (f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
            "time.sleep(120)")
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.compile_phases", "--out", str(tmp_path), "--log-out",
         str(tmp_path / "xla.log"), "--", sys.executable, "-c", prog], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline and wrapper.poll() is None
        time.sleep(0.05)
    child = int(pid_file.read_text())
    wrapper.send_signal(signal.SIGTERM)
    assert wrapper.wait(timeout=30) == 128 + signal.SIGTERM
    for _ in range(100):  # the child is gone (killed, then reaped by the wrapper)
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the command (pid {child}) outlived its wrapper")
