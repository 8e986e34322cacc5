"""`python -m benchmarks.run --quick` end to end (tiny model), and its figures / RESULTS.md."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._procs import quick_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A JAX compilation cache shared by this module's subprocesses: the quick run's memory
    section compiles its train section's step, and the device suite's inference and memory
    steps compile the quick run's programs (same model, flags and shapes): loads, not compiles."""
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory, jax_cache: str) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("run")
    md = out / "RESULTS.md"
    env = quick_env(JAX_COMPILATION_CACHE_DIR=jax_cache)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--device", "cpu",
         "--out", str(out), "--md", str(md)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.glob("run-*.json"))
    assert len(files) == 1, files
    from benchmarks.common import cpu_isa, machine_name

    # a CPU result is named after the vector ISA too (VMs of one name differ in it)
    assert files[0].name.startswith(f"run-{machine_name()}-{cpu_isa()}-"), files[0].name
    assert "VIPA benchmark suite" in proc.stdout  # the one table was printed
    return json.loads(files[0].read_text()), md


def test_quick_json_sections(quick_run: tuple[dict, Path]) -> None:
    res, _ = quick_run
    info = res["machine_info"]
    for key in ("machine", "processor", "cpu_count", "git_commit", "jax", "device_kind"):
        assert info.get(key), key
    assert res["benchmark"] == "run" and res["quick"] is True
    assert res["config"] == "synthetic:test" and res["backend"] == "cpu"
    assert res["targets"]["gpu_inference_ms_batch1"] == {"float32": 41.0, "bfloat16": 15.0}

    inf = {(e["dtype"], e["batch"]): e for e in res["inference"]}
    assert set(inf) == {("float32", 1), ("bfloat16", 1)}
    for e in inf.values():
        assert e["compile_s"] > 0 and e["xla_flops"] > 0 and e["n"] == 2
        assert 0 < e["median_ms"] <= e["p90_ms"]

    (tr,) = res["train"]
    assert (tr["dtype"], tr["remat"], tr["batch"]) == ("bfloat16", True, 2)
    assert tr["finite"] and tr["images_per_s"] > 0 and tr["compile_s"] > 0
    assert tr["xla_flops_per_step"] > 0 and tr["model_flops_per_step"] > 0
    assert tr["images_per_s"] == pytest.approx(2 / (tr["step_median_ms"] / 1e3))
    assert tr["xla_memory"]["estimate_bytes"] > 0
    assert tr["device_memory"] is None and tr["mfu"] is None  # CPU: n/a
    # no no-remat step ran: the model FLOPs are this step's traced without remat
    # (test_train_step_flops_leaves_out_remat checks that count)
    assert tr["model_flops_source"] == "this step without remat (jaxpr)"
    assert tr["model_flops_per_step"] == tr["no_remat_flops_per_step"] > 0
    (mem,) = res["memory"]  # the same step compiled: the same buffer assignment
    assert (mem["dtype"], mem["remat"], mem["batch"]) == ("bfloat16", True, 2)
    assert mem["estimate_bytes"] > 0 and "ran" not in mem
    assert mem["saved_for_backward_per_image_bytes"] > 0
    # the memory rows count what a GPU runs ('auto' -> XLA's convolution, bfloat16 results);
    # the train row what this CPU runs (bfloat16: nine-GEMM convolutions, float32 results), so
    # here the two are different programs
    assert (mem["conv_impl"], mem["dot_results"]) == ("xla", "native")
    assert mem["estimate_bytes"] != tr["xla_memory"]["estimate_bytes"]
    # the module's compilation cache is fresh: the first compiles are compiles
    assert not any(e["compile_cache_hit"] for e in inf.values()) and not mem["compile_cache_hit"]
    assert tr["compile_cache_hit"] is False

    cvt = res["cpu_vs_torch"]
    if "skipped" in cvt:  # no torch in this environment
        assert "torch" in cvt["skipped"]
        return
    names = list(cvt["backbones"])
    assert names[0].startswith("swin-") and names[1].startswith("bert-")
    for r in (*cvt["backbones"].values(), cvt["full_forward"], cvt["full_forward_xla"]):
        assert r["ratio"] > 0 and r["ours_median_ms"] > 0 and r["torch_median_ms"] > 0
        assert r["ratio_of_min_times"] > 0
    # the default decoder conv ('auto': Winograd's policy in float32 on CPU) and XLA's conv are
    # timed in the same blocks, against the same PyTorch time
    ff, xla = cvt["full_forward"], cvt["full_forward_xla"]
    impls = (ff["conv_impl_config"], ff["conv_impl"], xla["conv_impl"])
    assert impls == ("auto", "winograd", "xla")
    assert xla["torch_median_ms"] == ff["torch_median_ms"]
    assert max(r["max_abs_diff"] for r in cvt["backbones"].values()) < 1e-3


def test_quick_figures_labelled(quick_run: tuple[dict, Path]) -> None:
    from benchmarks.run import figures

    res, md = quick_run
    rows = figures(res)
    assert all(r["device"] == "cpu" and r["dtype"] in ("float32", "bfloat16") for r in rows)
    by_fig = {(r["figure"], r["dtype"]): r for r in rows}
    lat = by_fig[("inference latency (median)", "float32")]
    assert lat["target"] == "<= 41 ms (H100)" and lat["status"] == "n/a (GPU target)"
    assert by_fig[("inference latency (median)", "bfloat16")]["target"] == "<= 15 ms (H100)"
    assert by_fig[("train, remat on: MFU", "bfloat16")]["value"] == "n/a (CPU)"
    assert by_fig[("train, remat on: peak device memory", "bfloat16")]["value"].startswith("n/a")
    mem = by_fig[("train memory, remat on (XLA estimate)", "bfloat16")]
    assert mem["batch"] == 2 and mem["value"].endswith(" MiB") and float(mem["value"][:-4]) > 0
    assert mem["target"] == "<= 80 GB (one GPU)" and mem["status"] == "n/a (GPU target)"
    assert "jax#19822" in mem["p90"]
    if "skipped" not in res["cpu_vs_torch"]:
        xla = by_fig[("full VIPA forward / PyTorch Swin+BERT (decoder.conv_impl=xla)",
                      "float32")]
        assert xla["target"] == "<= 1.2x" and xla["value"].endswith(" ms)")
        ratio = res["cpu_vs_torch"]["full_forward_xla"]["ratio_of_min_times"]
        assert xla["p90"] == f"min/min {ratio:.2f}x"
        assert ("full VIPA forward / PyTorch Swin+BERT (decoder.conv_impl=auto: winograd)",
                "float32") in by_fig
    saved = by_fig[("saved for backward, remat on (JAX count)", "bfloat16")]
    assert saved["batch"] == 2 and "per image)" in saved["value"]
    # the quick run is not a result: RESULTS.md from that folder says there is no run yet
    text = md.read_text()
    assert "No GPU run yet" in text and "No CPU run yet" in text


def test_train_step_flops_leaves_out_remat() -> None:
    """MFU's model FLOPs of a remat step: 2 x the multiply-adds of the same step traced without
    remat, less than the remat step's own count (its recomputed forward), more than nothing;
    `--memory-targets` / `--train-configs` take a remat policy by name."""
    import jax

    from benchmarks.common import count_macs
    from benchmarks.input_pipeline import train_step_flops, train_step_setup
    from benchmarks.run import (
        _parse_remat,
        _remat_label,
        _with_remat,
        load_config,
        memory_target,
        train_config,
    )

    cfg = load_config("refcoco", quick=True)
    counts = {}
    for remat in (False, True):
        fn, state, data = train_step_setup(_with_remat(cfg, "float32", remat), 2, abstract=True)
        leaves = jax.tree.leaves((state, data))
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
        counts[remat] = 2.0 * count_macs(fn, state, data, jax.random.key(1))
    assert counts[True] > 1.1 * counts[False] > 0
    assert train_step_flops(_with_remat(cfg, "float32", True), 2) == counts[False]

    assert [_parse_remat(t) for t in ("off", "on", "dots_all")] == [False, True, "dots_all"]
    with pytest.raises(argparse.ArgumentTypeError, match="remat must be on, off or one of"):
        _parse_remat("yes")
    assert memory_target("48:off") == (48, False)
    assert memory_target("64:dots_all") == (64, "dots_all")
    assert train_config("bfloat16:on") == ("bfloat16", True)
    for bad, match in (("64", "expected BATCH:on"), ("x:on", "batch must be a positive"),
                       ("0:on", "batch must be a positive"), ("64:yes", "remat must be")):
        with pytest.raises(argparse.ArgumentTypeError, match=match):
            memory_target(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="dtype must be one of"):
        train_config("fp16:on")
    assert [_remat_label(r) for r in (False, True, "dots")] == ["off", "on", "on (dots)"]
    c = _with_remat(cfg, "bfloat16", "dots")
    assert (c.model.remat, c.model.remat_policy, c.model.dtype) == (True, "dots", "bfloat16")
    assert cfg.model.remat is False and cfg.model.remat_policy == "full"  # a copy


def test_markdown_and_mfu_from_results(tmp_path: Path) -> None:
    """A non-quick CPU result and a GPU result -> both sections, MFU against the H100 peak."""
    from benchmarks.run import _add_mfu, peak_flops, write_markdown

    assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16")[0] == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe", "float32")[0] == 378.0e12  # TF32 tensor cores
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bfloat16")[0] == 312.0e12
    assert peak_flops("cpu", "bfloat16")[0] is None

    def train(dtype: str, remat: bool, flops: float, ms: float) -> dict:
        return {"dtype": dtype, "remat": remat, "batch": 8, "image_size": 480,
                "xla_flops_per_step": flops, "step_median_ms": ms, "step_p90_ms": ms,
                "images_per_s": 8 / (ms / 1e3), "compile_s": 30.0,
                "device_memory": {"peak_bytes_in_use": 2**34}, "xla_memory": None}

    # XLA:GPU's compiled count leaves the cuDNN / cuBLAS calls out: MFU uses the HLO count
    # before optimization where the entry has it
    hlo = {**train("bfloat16", False, 1e13, 1000.0), "hlo_flops_per_step": 4e14}
    _add_mfu([hlo], "NVIDIA H100 80GB HBM3")
    assert hlo["mfu"] == pytest.approx(4e14 / 989.4e12)
    entries = [train("bfloat16", False, 4e14, 1000.0), train("bfloat16", True, 5e14, 1000.0)]
    _add_mfu(entries, "NVIDIA H100 80GB HBM3")
    assert entries[0]["mfu"] == pytest.approx(4e14 / 989.4e12)
    # remat: model FLOPs are the no-remat step's; HFU counts the recomputation
    assert entries[1]["mfu"] == pytest.approx(4e14 / 989.4e12)
    assert entries[1]["hfu"] == pytest.approx(5e14 / 989.4e12)
    # a remat step alone: its traced no-remat count, not its own (an older result without
    # that count falls back to its own and says so)
    alone = {**train("bfloat16", True, 5e14, 1000.0), "no_remat_flops_per_step": 4e14}
    older = train("bfloat16", True, 5e14, 1000.0)
    _add_mfu([alone], "NVIDIA H100 80GB HBM3")
    _add_mfu([older], "NVIDIA H100 80GB HBM3")
    assert alone["mfu"] == pytest.approx(4e14 / 989.4e12)
    assert alone["hfu"] == pytest.approx(5e14 / 989.4e12)
    assert older["mfu"] == older["hfu"] and older["model_flops_source"].endswith("included)")

    machine = {"machine": "box", "processor": "x", "cpus_used": 2, "cpu_count": 2,
               "python": "3.11", "jax": "0.10.2", "git_commit": "abc1234",
               "time_utc": "2026-01-01T00:00:00Z", "loadavg_1_5_15": [0.5, 0.5, 0.5]}
    gpu = {"benchmark": "run", "quick": False, "backend": "gpu", "config": "refcoco",
           "partial": "memory",
           "device_kind": "NVIDIA H100 80GB HBM3", "iters": 20, "command": "c",
           "load_start": {"busy_other_processes": 0}, "inference_image_size": 480,
           "machine_info": machine, "train": entries,
           "memory": [{"dtype": "bfloat16", "batch": 16, "remat": False, "image_size": 480,
                       "estimate_bytes": 60e9, "ran": True},
                      {"dtype": "bfloat16", "batch": 64, "remat": True, "image_size": 480,
                       "estimate_bytes": 70e9, "ran": False, "error": "out of memory"}],
           "inference": [{"dtype": "float32", "batch": 1, "image_size": 480, "median_ms": 50.0,
                          "p90_ms": 52.0, "compile_s": 70.0},
                         {"dtype": "bfloat16", "batch": 1, "image_size": 480, "median_ms": 9.0,
                          "p90_ms": 9.5, "compile_s": 95.0, "compile_cache_hit": True}]}
    (tmp_path / "run-box-nvidia_h100-2026-01-01.json").write_text(json.dumps(gpu))
    profile = {"benchmark": "profile", "quick": False, "backend": "gpu", "machine_info": machine,
               "mode": "inference", "batch": 1, "image_size": 480, "dtype": "bfloat16",
               "device_kind": "NVIDIA H100 80GB HBM3", "wall_median_ms": 12.0, "op_time_ms": 10.0,
               "by_module": [{"name": "encoder/backbone.run_stage", "ms": 6.0, "percent": 60.0}],
               "by_kind": [{"name": "gemm_fusion", "ms": 7.0, "percent": 70.0}]}
    (tmp_path / "profile-box-gpu.json").write_text(json.dumps(profile))
    (tmp_path / "profile-box-quick.json").write_text(json.dumps({**profile, "quick": True}))
    later = {**machine, "time_utc": "2099-01-01T00:00:00Z"}  # a newer profile of one part only
    (tmp_path / "profile-box-gpu-swin.json").write_text(json.dumps(
        {**profile, "part": "swin", "machine_info": later,
         "by_module": [{"name": "backbone/backbone.run_stage", "ms": 9.0, "percent": 90.0}]}))
    text = Path(write_markdown(str(tmp_path), str(tmp_path / "R.md"))).read_text()
    assert "No CPU run yet" in text and "No GPU run yet" not in text
    assert "Partial run: it stopped after the memory section" in text
    assert "Only 83% of the wall time" not in text  # 10 of 12 ms attributed: no warning
    assert "| encoder/backbone.run_stage | 6 | 60.0% |" in text  # the GPU profile's breakdown
    assert text.count("Where the time goes") == 1  # the quick profile is not a result
    assert "backbone/backbone.run_stage" not in text  # nor is the newer one of Swin alone
    assert "| inference latency (median) | float32 | 1 | 480 | 50.0 ms |" in text
    assert "misses" in text  # 50 ms > 41 ms and 70 s > 60 s
    # a program from the compilation cache: its load time is no compile time, met or missed
    assert ("| inference compile | bfloat16 | 1 | 480 | 95.0 s | loaded from the compilation "
            "cache | <= 60 s (GPU) | n/a (cache hit) |") in text
    assert "| train, remat off: MFU | bfloat16 | 8 | 480 | 40.4% |" in text
    assert "meets" in text  # 40.4% >= 40%
    assert ("| train memory, remat off (XLA estimate) | bfloat16 | 16 | 480 | 55.9 GiB "
            "| step ran | <= 80 GB (one GPU) | meets |") in text
    assert ("| train memory, remat on (XLA estimate) | bfloat16 | 64 | 480 | 65.2 GiB "
            "| step out of memory | <= 80 GB (one GPU) | misses |") in text
    # a newer GPU run with only some sections: shown first, the earlier one still shown
    newer = {**gpu, "inference": [], "machine_info": {**machine, "git_commit": "def5678",
                                                       "time_utc": "2026-02-01T00:00:00Z"}}
    (tmp_path / "run-box-nvidia_h100-2026-02-01.json").write_text(json.dumps(newer))
    text = Path(write_markdown(str(tmp_path), str(tmp_path / "R.md"))).read_text()
    assert text.index("Commit `def5678`") < text.index("An earlier GPU run") < text.index(
        "Commit `abc1234`") < text.index("| inference latency (median) | float32 | 1 | 480 |")


def test_cpu_results_by_vector_isa(tmp_path: Path) -> None:
    """CPU results get one RESULTS.md section per vector ISA (the AVX2 run does not replace the
    AVX-512 one); results from before the ISA was recorded are labelled so."""
    from benchmarks.common import cpu_isa
    from benchmarks.run import write_markdown

    assert cpu_isa("fpu sse4_2 avx avx2 fma") == "avx2"
    assert cpu_isa("avx2 avx512f avx512_bf16 amx_tile") == "avx512+bf16+amx"
    assert cpu_isa("fp asimd") == "neon" and cpu_isa("") == "unknown"

    def cpu_run(isa: str | None, when: str, ratio: float) -> dict:
        machine = {"machine": "vm-2cpu", "processor": "AMD EPYC", "cpus_used": 2,
                   "cpu_count": 2, "python": "3.11", "jax": "0.10.2", "git_commit": "abc1234",
                   "time_utc": when, "loadavg_1_5_15": [0.5, 0.5, 0.5]}
        if isa:
            machine.update(cpu_isa=isa, cpu_id="AuthenticAMD family 25 model 1")
        return {"benchmark": "run", "quick": False, "backend": "cpu", "config": "refcoco",
                "device_kind": "cpu", "iters": 7, "command": "c", "machine_info": machine,
                "load_start": {"busy_other_processes": 0}, "inference_image_size": 480,
                "cpu_vs_torch": {"full_forward": {"ratio": ratio, "torch_median_ms": 1000.0,
                                                  "ours_median_ms": 1000.0 * ratio}}}

    for name, isa, when, ratio in (("old", None, "2026-01-01T00:00:00Z", 1.21),
                                   ("a", "avx2", "2026-01-02T00:00:00Z", 2.5),
                                   ("b", "avx2", "2026-01-03T00:00:00Z", 2.0)):
        (tmp_path / f"run-{name}.json").write_text(json.dumps(cpu_run(isa, when, ratio)))
    text = Path(write_markdown(str(tmp_path), str(tmp_path / "R.md"))).read_text()
    assert "## CPU (avx2)" in text and "## CPU (ISA not recorded)" in text
    assert "AuthenticAMD family 25 model 1, avx2, 2 of 2 CPUs" in text
    assert "2026-01-03" in text and "2026-01-02" not in text  # the newest AVX2 run only
    assert "2026-01-01" in text  # the unrecorded-ISA run keeps its own section
    assert "| 2.00x (2000 vs 1000 ms) | | <= 1.2x | misses |" in text.replace("|  |", "| |")
    assert "| 1.21x (1210 vs 1000 ms) | | <= 1.2x | misses |" in text.replace("|  |", "| |")


def test_split_runs_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that skips sections takes them from today's earlier run of the same commit and
    device (a GPU session split over calls), and says so; other commits are never mixed in."""
    from benchmarks import common
    from benchmarks.run import earlier_result, merge_earlier

    info = {**common.machine_info(), "git_dirty": False}
    monkeypatch.setattr(common, "machine_info", lambda: info)
    first = {"benchmark": "run", "quick": False, "config": "refcoco", "backend": "gpu",
             "device_kind": "H100", "command": "run --no-train", "machine_info": info,
             "inference": [{"dtype": "float32"}], "memory": [{"batch": 16}],
             "cpu_vs_torch": {"skipped": "CPU-only section"}}
    path = tmp_path / "run-x.json"
    path.write_text(json.dumps(first))
    second = {"config": "refcoco", "backend": "gpu", "device_kind": "H100",
              "train": [{"batch": 8}], "cpu_vs_torch": {"skipped": "CPU-only section"}}
    earlier = earlier_result(str(path), second)
    assert earlier is not None
    notes: list[str] = []
    merged = merge_earlier(second, earlier, notes)
    assert merged["inference"] == first["inference"] and merged["memory"] == first["memory"]
    assert merged["train"] == [{"batch": 8}] and "skipped" in merged["cpu_vs_torch"]
    assert len(notes) == 1 and notes[0].startswith("inference, memory: from the earlier run")
    # another commit, device or config: nothing is taken
    for key, value in (("device_kind", "A100"), ("config", "synthetic")):
        assert earlier_result(str(path), {**second, key: value}) is None
    # train rows merge per (dtype, remat): a later call adds float32 rows to bfloat16 ones
    bf16 = [{"dtype": "bfloat16", "remat": False, "batch": 16},
            {"dtype": "bfloat16", "remat": True, "batch": 64}]
    path.write_text(json.dumps({**first, "train": bf16}))
    third = {**second, "train": [{"dtype": "float32", "remat": False, "batch": 16},
                                 {"dtype": "bfloat16", "remat": True, "batch": 128}]}
    notes = []
    merged = merge_earlier(third, earlier_result(str(path), third), notes)
    assert [(e["dtype"], e["remat"], e["batch"]) for e in merged["train"]] == [
        ("float32", False, 16), ("bfloat16", True, 128), ("bfloat16", False, 16)]
    assert "train (bfloat16 remat off)" in notes[0]
    path.write_text(json.dumps({**first, "machine_info": {**info, "git_commit": "0000000"}}))
    assert earlier_result(str(path), second) is None


def test_memory_rows_become_train_rows() -> None:
    """`--train-at-memory-targets`: the memory rows' timed steps are the train section (with
    MFU against the no-remat step's FLOPs per image); an out-of-memory row has no train row."""
    from benchmarks.run import split_memory_rows

    def step(batch: int, flops: float) -> dict:
        return {"batch": batch, "image_size": 480, "hlo_flops_per_step": flops,
                "xla_flops_per_step": 1.0, "step_median_ms": 100.0, "images_per_s": batch / 0.1,
                "compile_s": 50.0}

    rows = [{"dtype": "bfloat16", "batch": 16, "remat": False, "estimate_bytes": 3e10,
             "ran": True, "step": step(16, 2e13)},
            {"dtype": "bfloat16", "batch": 64, "remat": True, "estimate_bytes": None,
             "ran": False, "error": "out of memory"}]
    memory, train = split_memory_rows(rows, "NVIDIA H200")
    assert [("step" in m) for m in memory] == [False, False] and memory[1]["ran"] is False
    assert len(train) == 1 and train[0]["batch"] == 16 and train[0]["remat"] is False
    assert train[0]["batches_tried"] == [{"batch": 16, "images_per_s": 160.0}]
    assert train[0]["mfu"] == pytest.approx(2e13 / 0.1 / 989.4e12)
    rows[1].update(ran=True, step=step(64, 1e14))  # remat recomputes: model FLOPs stay 4 x 2e13
    _, train = split_memory_rows(rows, "NVIDIA H200")
    assert train[1]["model_flops_per_step"] == pytest.approx(8e13)
    assert train[1]["hfu"] == pytest.approx(1e14 / 0.1 / 989.4e12)


def test_memory_rows_count_the_gpu_convolution() -> None:
    """The memory rows are about a GPU: the default 'auto' (Winograd on a CPU backend, whose
    tiles the backward keeps) becomes XLA's convolution there, and 'auto' bfloat16 results
    'native'; an explicit choice is kept, and the caller's config is not changed."""
    from benchmarks.run import _as_on_gpu
    from configs import refcoco
    from vipa_jax.models.decoder import resolve_conv_impl

    cfg = refcoco.get_config()
    assert cfg.model.decoder.conv_impl == "auto" and resolve_conv_impl("auto") == "winograd"
    assert cfg.model.dot_results == "auto"
    gpu = _as_on_gpu(cfg)
    assert (gpu.model.decoder.conv_impl, gpu.model.dot_results) == ("xla", "native")
    assert (cfg.model.decoder.conv_impl, cfg.model.dot_results) == ("auto", "auto")
    cfg.model.decoder.conv_impl = "winograd4"
    assert _as_on_gpu(cfg).model.decoder.conv_impl == "winograd4"
    cfg.model.dot_results = "float32"
    assert _as_on_gpu(cfg) is cfg


def test_device_suite_quick(tmp_path: Path, jax_cache: str) -> None:
    """`benchmarks/device_suite.sh` (the GPU suite in one short lease) on the tiny model on the
    CPU: every step runs inside its budget and leaves its result."""
    env = quick_env(SUITE_QUICK="1", OUT=str(tmp_path), PYTHON=sys.executable,
                    SUITE_TIME_SCALE="2",  # the GPU's step limits and budget (540 s) x 2
                    JAX_COMPILATION_CACHE_DIR=jax_cache)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_suite.sh")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1300)
    log = (tmp_path / "device_suite.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    for name in ("inference", "memory+train", "profile", "profile-train", "train-float32"):
        assert f"== {name}: exit 0 after" in log, log[-3000:]
    assert "== done after" in log
    # the memory row's step was timed (the train section at the memory targets)
    assert "memory  bfloat16 remat on    batch 2:" in log and "step ran," in log
    assert "train float32  remat off   batch 16:" in log
    profiles = sorted(p.name for p in tmp_path.glob("profile-*.json"))
    assert len(profiles) == 2 and "-train-bfloat16" in profiles[1], profiles
    assert len(list(tmp_path.glob("run-*.json"))) == 1
    # a misspelt step stops the suite with an error instead of being skipped
    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_suite.sh")], cwd=ROOT,
                         env={**env, "SUITE_STEPS": "inference-b1"}, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "unknown step" in bad.stdout


def test_device_suite_gpu_command_lines(tmp_path: Path) -> None:
    """The suite's GPU branch (not run by the quick CPU check), with a stand-in for Python that
    prints what it was given: MEMORY_TARGETS reaches `--memory-targets` (memory-remat: the last
    row), train-float32 gets cuBLAS GEMMs unless F32_XLA_FLAGS says otherwise, every step gets
    the autotune cache (both of XLA's flags for it), train-ab's base is the batch-16 step
    without remat (AB_ROW and AB_NO_BASE change that), and COMPILE_PHASES=1 wraps a step in
    `benchmarks.compile_phases`."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\necho "XLA_FLAGS=[$XLA_FLAGS]"; echo "ARGS=[$*]"\n')
    stub.chmod(0o755)

    def suite(step: str, **env: str) -> dict[str, str]:
        proc = subprocess.run(
            ["bash", str(ROOT / "benchmarks" / "device_suite.sh"), "__cmd", step], cwd=ROOT,
            env={k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SUITE_QUICK")}
            | {"PYTHON": str(stub), "OUT": str(tmp_path)} | env,
            capture_output=True, text=True, timeout=60, check=True)
        return dict(line.split("=", 1) for line in proc.stdout.splitlines())

    out = suite("memory-remat", MEMORY_TARGETS="16:off 48:off")
    assert out["ARGS"].startswith("[-m benchmarks.run --device gpu --no-infer")
    assert "--memory-targets 16:off 48:off --train-at-memory-targets" in out["ARGS"]
    assert out["ARGS"].endswith("--memory-targets 48:off]")  # argparse: the last one wins
    for flag in ("per_fusion_autotune_cache_dir", "experimental_autotuner_cache_dir"):
        assert f"--xla_gpu_{flag}=/tmp/vipa_jax-autotune" in out["XLA_FLAGS"]
    assert "--memory-targets 16:off 64:on " in suite("memory+train")["ARGS"]  # the default
    f32 = suite("train-float32")
    assert "--xla_gpu_enable_triton_gemm=false" in f32["XLA_FLAGS"]
    assert "--train-configs float32:off --no-search --train-batch 16" in f32["ARGS"]
    assert "triton" not in suite("train-float32", F32_XLA_FLAGS="")["XLA_FLAGS"]
    ab = suite("train-ab")["ARGS"]
    assert "-m benchmarks.train_ab --device gpu --dtype bfloat16 --batch 16 --out" in ab
    assert "--remat" not in ab and "--no-base" not in ab
    ab = suite("train-ab", AB_ROW="64:on", AB_NO_BASE="1")["ARGS"]  # the MFU row, variants only
    assert "--dtype bfloat16 --batch 64 --remat --no-base --out" in ab
    inp = suite("input", INPUT_WORKERS="0 6")["ARGS"]  # no compile: never under compile_phases
    assert inp == (f"[-m benchmarks.input_pipeline --steps 30 --workers 0 6 --threads 2 8 16 "
                   f"--out {tmp_path}]")
    assert "--workers 0 8 --threads 4 " in suite("input", COMPILE_PHASES="1",
                                                 INPUT_THREADS="4")["ARGS"]
    # COMPILE_PHASES=1: each step runs under benchmarks.compile_phases
    ab = suite("train-ab", COMPILE_PHASES="1")["ARGS"]
    assert ab.startswith(f"[-m benchmarks.compile_phases --module jit_train_step --out {tmp_path}"
                         " --tag train-ab --log-out /tmp/compile_phases-train-ab.log -- ")
    assert f" -- {stub} -m benchmarks.train_ab --device gpu" in ab


def _quick_suite_step(tmp_path: Path, step: str, pattern: str, timeout: int,
                      **env: str) -> dict:
    """`benchmarks/device_suite.sh` with SUITE_STEPS=`step` alone, quick, on the CPU: it exits
    0 inside its budget; the one result file matching `pattern`, loaded."""
    env = quick_env(SUITE_QUICK="1", OUT=str(tmp_path), PYTHON=sys.executable,
                    SUITE_STEPS=step, **env)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_suite.sh")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    log = (tmp_path / "device_suite.log").read_text()
    assert proc.returncode == 0 and f"== {step}: exit 0 after" in log, log[-3000:]
    (path,) = tmp_path.glob(pattern)
    return json.loads(path.read_text())


def test_device_suite_input_step_quick(tmp_path: Path) -> None:
    """The suite's `input` step (`benchmarks.input_pipeline` in its smallest configuration on
    the CPU) runs inside its budget and writes its result."""
    res = _quick_suite_step(tmp_path, "input", "input_pipeline-*.json", 300)
    assert res["batch"] == 2 and res["results"][0]["batches_per_s"] > 0


def test_device_suite_attention_step_quick(tmp_path: Path, jax_cache: str) -> None:
    """The suite's `attention` step (`benchmarks.attention --train` on the tiny Swin on the CPU)
    with the variants ATTN_IMPLS names (einsum, xla): each compiles and is timed, both give the
    first one's gradients, and the JSON says so."""
    res = _quick_suite_step(tmp_path, "attention", "attention-*-train-float32.json", 600,
                            SUITE_TIME_SCALE="2", ATTN_IMPLS="einsum xla",
                            JAX_COMPILATION_CACHE_DIR=jax_cache)
    variants = res["variants"]
    assert res["mode"] == "train" and res["quick"] and res["reference"] == "einsum"
    assert list(variants) == ["einsum", "xla"]
    assert variants["xla"]["overrides"] == {"attention_impl": "xla"}
    for name, e in variants.items():
        assert "error" not in e and e["median_ms"] > 0 and e["compile_s"] > 0, (name, e)
        assert e["speedup"] > 0
        assert e["max_rel_diff"] < 1e-4, name  # the same gradients (float32)
    assert variants["einsum"]["max_rel_diff"] == 0.0


def test_attention_variant_errors() -> None:
    """An unknown named variant is an error naming it; a bad Swin value is recorded as that
    variant's error, and the others still run."""
    from benchmarks import attention

    with pytest.raises(ValueError, match="unknown attention variants \\['flash'\\]"):
        attention.run(quick=True, impls=["flash"], write=False)
    res = attention.run(quick=True, impls=["einsum"], variants=[("bad", {"qkv_projection": "x"})],
                        write=False, iters=1)
    assert "swin.qkv_projection must be one of" in res["variants"]["bad"]["error"]
    assert res["variants"]["einsum"]["median_ms"] > 0


def test_train_ab_variants_parse_and_apply() -> None:
    """`--variant NAME:KEY=VALUE,...`: literals are parsed, bare words stay strings, and an
    override of a key the config lacks is an error that names it (never a silent no-op)."""
    from benchmarks.train_ab import apply_overrides, parse_variant
    from configs import refcoco

    assert parse_variant("cond:train.finite_guard=cond,model.remat=True") == (
        "cond", {"train.finite_guard": "cond", "model.remat": True})
    assert parse_variant("k:model.veg.topk_ratio=0.5") == ("k", {"model.veg.topk_ratio": 0.5})
    # commas inside brackets or quotes belong to the value
    assert parse_variant("d6:model.swin.depths=(2,2,6,2),model.remat=True") == (
        "d6", {"model.swin.depths": (2, 2, 6, 2), "model.remat": True})
    assert parse_variant("s:a=[1,(2,3)],b='x,y',c=--f=1 --g=2") == (
        "s", {"a": [1, (2, 3)], "b": "x,y", "c": "--f=1 --g=2"})
    for bad in ("cond", "cond:", ":a=b", "c:a", "c:=1", "c:a=(1,2", "c:a=1)", "c:a='x,b=1"):
        with pytest.raises(ValueError, match="--variant"):
            parse_variant(bad)
    cfg = refcoco.get_config()
    out = apply_overrides(cfg, {"train.finite_guard": "cond", "model.swin.attention_impl": "xla"})
    assert out.train.finite_guard == "cond" and out.model.swin.attention_impl == "xla"
    assert cfg.train.finite_guard == "auto" and cfg.model.swin.attention_impl == "einsum"
    with pytest.raises(KeyError, match="model.swin.nope"):
        apply_overrides(cfg, {"model.swin.nope": 1})
    with pytest.raises(KeyError, match="'modl'"):
        apply_overrides(cfg, {"modl.remat": True})


def test_compile_only_raises_once_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """`$VIPA_BENCH_COMPILE_ONLY`: `compile_jax` compiles, then raises `CompiledOnly` with the
    compile info (a BaseException: the scripts' `except Exception` must not swallow it)."""
    import numpy as np

    from benchmarks import common

    x = np.ones((4, 4), np.float32)
    monkeypatch.setenv(common.COMPILE_ONLY_ENV, "1")
    with pytest.raises(common.CompiledOnly) as done:
        common.compile_jax(lambda a: a @ a, x)
    assert not isinstance(done.value, Exception)
    assert done.value.args[0]["hlo_flops"] == 2 * 4**3 and done.value.args[0]["compile_s"] > 0
    monkeypatch.delenv(common.COMPILE_ONLY_ENV)
    compiled, info = common.compile_jax(lambda a: a @ a, x)
    np.testing.assert_allclose(np.asarray(compiled(x)), 4 * x)
    assert info["hlo_flops"] == 2 * 4**3 and info["hlo_flops_source"] == "hlo"
    # where XLA counts no FLOPs before optimization (XLA:GPU, jax 0.11.2, the train step), the
    # count is 2 x the jaxpr's multiply-adds, and says so
    monkeypatch.setattr(common, "cost_of", lambda c: {"flops": 0.0})
    _, info = common.compile_jax(lambda a: a @ a + 1.0, x)
    assert info["hlo_flops"] == 2 * 4**3 and info["hlo_flops_source"] == "jaxpr_macs"


def test_train_ab_quick(tmp_path: Path, quick_run: tuple[dict, Path], jax_cache: str) -> None:
    """`benchmarks.train_ab` on the quick memory row's step (bfloat16, batch 2, remat): the base
    and a variant that is the same program on a CPU (`finite_guard` auto = cond) both load it
    from the cache the quick run filled (the cache key `device_suite.sh`'s precompile relies
    on), take the same first step and are timed side by side; a remat row counts its model
    FLOPs for the MFU."""
    env = quick_env(JAX_COMPILATION_CACHE_DIR=jax_cache)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_ab", "--quick", "--device", "cpu", "--dtype",
         "bfloat16", "--batch", "2", "--remat", "--variant", "cond:train.finite_guard=cond",
         "--variant", "split:train.split_update=True", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("train_ab-*-cpu-*-bfloat16-b2-remat.json")
    res = json.loads(path.read_text())
    base, cond = res["variants"]["base"], res["variants"]["cond"]
    assert cond["overrides"] == {"train.finite_guard": "cond"}
    for e in (base, cond):
        assert e["compile_cache_hit"] is True, e
        assert e["step_median_ms"] > 0 and e["n"] == 2 and e["images_per_s"] > 0
        assert e["flop_utilization"] is None  # no peak FLOP/s on a CPU
        assert e["mfu"] is None  # no peak either; its FLOPs are counted all the same:
        # the model's (the step traced without remat: 147 M) under the compiled step's (211 M:
        # the recomputation, and XLA:CPU's cost analysis counts elementwise ops too)
        assert 0 < e["model_flops_per_step"] < 0.9 * e["hlo_flops_per_step"]
    assert cond["model_flops_per_step"] == base["model_flops_per_step"]
    assert cond["first_loss"] == base["first_loss"] and cond["speedup_vs_first"] > 0
    # `train.split_update`: two programs (not the cached one), the same step and FLOPs
    split = res["variants"]["split"]
    assert split["compile_cache_hit"] is False and split["step_median_ms"] > 0
    assert set(split["program_compile_s"]) == {"grads", "apply"}
    assert split["first_loss"] == pytest.approx(base["first_loss"], rel=1e-5)
    assert split["model_flops_per_step"] == base["model_flops_per_step"]
    assert split["hlo_flops_per_step"] == pytest.approx(base["hlo_flops_per_step"], rel=0.05)


def test_lowp_gemm_quick(tmp_path: Path) -> None:
    """`benchmarks.lowp_gemm --quick`: every GEMM and convolution form runs, is timed and is the
    float32 form's product to bfloat16 rounding; the JSON lands in the results folder."""
    from benchmarks import lowp_gemm

    res = lowp_gemm.run(quick=True, out_dir=str(tmp_path))
    rows = res["rows"]
    forms = {(r["kind"], r["form"]) for r in rows}
    assert forms == {("gemm", "float32"), ("gemm", "bf16 native"), ("gemm", "bf16 float32 results"),
                     ("conv", "float32 xla"), ("conv", "bf16 xla"), ("conv", "bf16 taps")}
    for r in rows:
        assert r["median_ms"] > 0 and r["gflops_per_s"] > 0, r
        if r["form"].startswith("float32"):
            assert r["max_rel_err"] == 0.0
        else:  # bfloat16 operands: about 2^-8 of the largest output
            assert 0 < r["max_rel_err"] < 2e-2, r
    assert json.loads(Path(res["path"]).read_text())["rows"] == rows
