"""Issue 8's benchmark suite: VIPA inference latency, training throughput, memory, MFU, and (CPU)
our backbones vs PyTorch — one table, one JSON, and `benchmarks/RESULTS.md`.

``python -m benchmarks.run [--device cpu|gpu] [--config refcoco|synthetic] [--quick] [--iters N]``
writes ``benchmarks/results/run-<machine>-<gpu or CPU ISA>-<date>.json`` and (except with
``--quick``) regenerates ``benchmarks/RESULTS.md`` from every ``run-*.json`` there
(``--md-only``: just that).

Sections (every figure carries dtype, batch, image size and device kind, and the issue's target):
- inference: the full VIPA forward (`train=False`), paper config (`configs/refcoco.py`: Swin-B w12
  + BERT-base, 480×480, 21 tokens), batch 1 and 8 on GPU (1 on CPU; `--infer-batch`), float32
  and bfloat16 compute (`model.dtype`; parameters stay float32). Compile = lower + XLA compile;
  a program that JAX's persistent compilation cache supplied (`JAX_COMPILATION_CACHE_DIR`, e.g.
  a second `device_suite.sh` call in one lease) is marked `compile_cache_hit` and its load time
  does not count against the compile target;
  latency = median and p90 of `--iters` timed calls after one warm-up (`common.time_call`).
- train: the real jitted train step (`benchmarks.input_pipeline.compile_train_step`: loss, grads,
  AdamW update, frozen-parameter mask; state donated), with and without `model.remat`, float32
  and bfloat16. GPU: the batch doubles from `--train-batch` until XLA runs out of memory and the
  largest batch that fitted is reported; CPU: `--train-batch` as given. Throughput = batch /
  median step time. Memory: XLA's `memory_analysis()` of the step (arguments + outputs + temps
  − donated; every backend) and `jax.devices()[0].memory_stats()` (GPU only; its peak is the
  process-wide peak so far, so it includes earlier configs and failed batch sizes).
- MFU (GPU): model FLOPs per step / median step time / the device's peak FLOP/s for the
  compute dtype (`PEAK_FLOPS`, keyed by `device_kind`; float32 is compared with the TF32
  tensor-core peak, which XLA uses for float32 matmuls by default). Model FLOPs = XLA's
  `cost_analysis()` flops of the step without remat, counted on the HLO before optimization
  (`hlo_flops`: XLA:GPU's compiled count omits cuDNN / cuBLAS calls), per image × batch, so the
  recomputation of remat does not count; HFU uses the step's own count (recomputation included).
- memory: does the train step of the paper's recipe fit one 80 GB GPU without accumulation, at
  global batch 16 and at batch 64 with remat (`MEMORY_TARGETS`), per dtype? XLA's
  `memory_analysis()` estimate of the compiled step (compile only), and on a GPU one real step
  (out of memory = misses). On CPU the estimate comes from XLA:CPU's buffer assignment, which
  ignores `jax.checkpoint` (jax#19822: XLA:CPU drops the optimization barriers that keep the
  recomputation apart, so it is CSE'd with the forward), so there the remat rows say nothing
  about remat. Next to it, JAX's own count of the bytes saved for the backward pass (one image,
  × batch; `common.saved_residual_bytes`), which is backend-independent. Both count the decoder
  convolution a GPU runs (`decoder.conv_impl='auto'` → XLA's, not the CPU's Winograd, whose
  tiles add ~0.25 GiB per image) and its bfloat16 matmul results (`_as_on_gpu`). `--no-memory` skips
  it (on CPU it costs ~1 min of compile per row). The GPU run sets
  `XLA_PYTHON_CLIENT_MEM_FRACTION=0.95` unless set.
- cpu_vs_torch (CPU, needs torch): `benchmarks.backbones.run` (our Swin-B and BERT-base vs
  transformers' PyTorch models, same weights and inputs, alternating blocks) and
  `benchmarks.model.time_forward` (the full VIPA forward vs PyTorch Swin-B + BERT-base). The
  ratios are the figures that count; absolute CPU times depend on the load (recorded).

A run that skips sections (`--no-infer`, `--no-memory`, `--no-train`, `--no-torch`) takes them
from today's earlier result in the same file when it is the same commit, config and device, and
notes it: a GPU session can split the suite over calls that each fit a per-call time limit, e.g.
``--no-train --out $OUT`` then ``--no-infer --no-memory --out $OUT``, and still get one result.
Train rows merge per (dtype, remat): a later call can add float32 rows to earlier bfloat16 ones.
``--train-at-memory-targets`` times the memory check's steps and reports them as the train
section (no batch search, no second compile of the same step): the short-lease GPU recipe is
``benchmarks/device_suite.sh``.

``--quick`` = the tiny `configs/synthetic.py:test` model, 2 iterations, batch 1 inference, train
step at batch 2 for (bfloat16, remat) only, memory check at batch 2 (bfloat16, remat) only
(each train-step compile costs ~20 s on 2 CPUs even for the tiny model): the smoke test; its
timings mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import gc
import glob
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import common

TARGETS = {
    "gpu_inference_ms_batch1": {"float32": 41.0, "bfloat16": 15.0},  # one H100
    "gpu_train_mfu_bfloat16": 0.40,
    "gpu_compile_s": 60.0,
    "cpu_full_forward_over_torch_backbones": 1.2,
    "cpu_backbones_over_torch": 0.8,
    "gpu_memory_bytes": 80e9,  # one 80 GB GPU
}
# (global batch, remat) that must train on one 80 GB GPU without gradient accumulation (issue 8).
MEMORY_TARGETS: tuple[tuple[int, bool], ...] = ((16, False), (64, True))
MEMORY_TARGETS_QUICK: tuple[tuple[int, bool], ...] = ((2, True),)

# Dense peak FLOP/s per device kind (NVIDIA datasheets, no sparsity). First substring match
# of `jax.devices()[0].device_kind` wins, so the more specific names come first.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bfloat16": 989.4e12, "tf32": 494.7e12, "float32": 66.9e12}),
    ("H100 PCIe", {"bfloat16": 756.5e12, "tf32": 378.0e12, "float32": 51.2e12}),
    ("H100 NVL", {"bfloat16": 835.5e12, "tf32": 417.5e12, "float32": 60.0e12}),
    ("H100", {"bfloat16": 989.4e12, "tf32": 494.7e12, "float32": 66.9e12}),  # SXM5
    ("A100", {"bfloat16": 312.0e12, "tf32": 156.0e12, "float32": 19.5e12}),
)

DTYPES = ("float32", "bfloat16")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_MD = os.path.join(REPO_ROOT, "benchmarks", "RESULTS.md")


def peak_flops(device_kind: str, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s, which peak) for a device kind and compute dtype; (None, reason) if unknown."""
    for key, peaks in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            which = "tf32" if dtype == "float32" else dtype
            return peaks[which], f"{key} {which} dense"
    return None, f"no peak FLOP/s for {device_kind!r}"


def load_config(name: str, quick: bool) -> Any:
    """The full config: `configs/<name>.py`, or the tiny `synthetic:test` with quick."""
    from configs import refcoco, synthetic

    if quick:
        return synthetic.get_config("test")
    return (synthetic if name == "synthetic" else refcoco).get_config()


def _with(cfg: Any, **model: Any) -> Any:
    out = copy.deepcopy(cfg)
    for k, v in model.items():
        setattr(out.model, k, v)
    return out


def _parse_remat(text: str) -> bool | str:
    """'off' -> False, 'on' -> True (the config's `model.remat_policy`, 'full' by default), or a
    policy name of `layers.REMAT_POLICIES` ('dots', 'dots_all'): remat on with that policy."""
    from vipa_jax.models.layers import REMAT_POLICIES

    if text in ("on", "off"):
        return text == "on"
    if text not in REMAT_POLICIES:
        raise argparse.ArgumentTypeError(
            f"remat must be on, off or one of {sorted(REMAT_POLICIES)}: {text!r}")
    return text


def _pair(text: str, what: str) -> tuple[str, bool | str]:
    """'X:REMAT' -> (X, `_parse_remat(REMAT)`), or an argparse error naming the format `what`
    (e.g. 'BATCH:on|off|POLICY')."""
    head, sep, remat = text.partition(":")
    if not sep or not head:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return head, _parse_remat(remat)


def memory_target(text: str) -> tuple[int, bool | str]:
    """`--memory-targets` item 'BATCH:on|off|POLICY' -> (batch, remat)."""
    batch, remat = _pair(text, "BATCH:on|off|POLICY")
    if not batch.isdigit() or int(batch) < 1:
        raise argparse.ArgumentTypeError(f"batch must be a positive integer, got {text!r}")
    return int(batch), remat


def train_config(text: str) -> tuple[str, bool | str]:
    """`--train-configs` item 'DTYPE:on|off|POLICY' -> (dtype, remat)."""
    dtype, remat = _pair(text, "DTYPE:on|off|POLICY")
    if dtype not in DTYPES:
        raise argparse.ArgumentTypeError(f"dtype must be one of {DTYPES}, got {text!r}")
    return dtype, remat


def _remat_label(remat: bool | str) -> str:
    return "off" if not remat else "on" if remat is True else f"on ({remat})"


def _with_remat(cfg: Any, dtype: str, remat: bool | str) -> Any:
    """`cfg` in `dtype` with `model.remat` (and `model.remat_policy` where `remat` names one)."""
    policy = {"remat_policy": remat} if isinstance(remat, str) else {}
    return _with(cfg, dtype=dtype, remat=bool(remat), **policy)


def _as_on_gpu(cfg: Any) -> Any:
    """`cfg` with the forms a GPU runs where the config says 'auto', which the memory rows are
    about: on a CPU backend the decoder convolution resolves to Winograd (float32; the backward
    keeps its transformed tiles: +253 MiB per image for the paper config) or to nine GEMMs
    (bfloat16), and bfloat16 matmuls to float32 results (`model.dot_results`); on a GPU to
    XLA's convolution and bfloat16 results."""
    conv_auto = cfg.model.decoder.conv_impl == "auto"
    dots_auto = cfg.model.get("dot_results", "auto") == "auto"
    if not (conv_auto or dots_auto):
        return cfg
    out = copy.deepcopy(cfg)
    if conv_auto:
        out.model.decoder.conv_impl = "xla"
    if dots_auto:
        out.model.dot_results = "native"
    return out


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return "resource_exhausted" in text or "out of memory" in text


# ------------------------------------------------------------------------------------------
# inference
# ------------------------------------------------------------------------------------------


def inference_section(
    cfg: Any, dtypes: Sequence[str], batches: Sequence[int], iters: int,
) -> tuple[list[dict[str, Any]], dict[tuple[str, int], Any], Any]:
    """Compile + time the full forward per (dtype, batch) -> (entries, compiled fns, variables)."""
    import jax

    from benchmarks.input_pipeline import forward_setup
    from benchmarks.model import random_variables
    from vipa_jax.models.vipa import build_model, init_variables

    m = cfg.model
    shapes = jax.eval_shape(
        lambda k: init_variables(build_model(m), k, m.image_size, m.max_tokens),
        jax.random.key(0))
    variables = random_variables(shapes)
    entries, compiled_fns = [], {}
    for dtype in dtypes:
        for batch in batches:
            fwd, args = forward_setup(_with(cfg, dtype=dtype), batch, variables)
            compiled, info = common.compile_jax(fwd, *args)
            load = common.load_snapshot()
            t = common.time_call(lambda c=compiled, a=args: c(*a), iters=iters, warmup=1)
            entry = {
                "dtype": dtype, "batch": batch, "image_size": m.image_size,
                "tokens": m.max_tokens, "compile_s": info["lower_s"] + info["compile_s"],
                "compile_cache_hit": info["cache_hit"],
                "lower_s": info["lower_s"], "xla_compile_s": info["compile_s"],
                "xla_flops": info["flops"], "hlo_flops": info["hlo_flops"],
                "median_ms": t["median_s"] * 1e3,
                "p90_ms": t["p90_s"] * 1e3, "min_ms": t["min_s"] * 1e3, "n": t["n"],
                "first_call_s": t["first_call_s"], "xla_memory": common.memory_of(compiled),
                "load_before": load,
            }
            entries.append(entry)
            compiled_fns[(dtype, batch)] = compiled
            print(f"  inference {dtype:8s} batch {batch}: compile {entry['compile_s']:.1f} s, "
                  f"median {entry['median_ms']:.1f} ms (p90 {entry['p90_ms']:.1f})", flush=True)
    return entries, compiled_fns, shapes


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------


def _model_flops(cfg: Any, batch: int) -> dict[str, float]:
    """MFU's model FLOPs for a remat step: the same step traced without remat (no device memory;
    `_add_mfu`), as {'no_remat_flops_per_step': ...}; {} for a step without remat."""
    from benchmarks.input_pipeline import train_step_flops

    return {"no_remat_flops_per_step": train_step_flops(cfg, batch)} if cfg.model.remat else {}


def train_one(cfg: Any, batch: int, iters: int, *, model_flops: bool = True) -> dict[str, Any]:
    """Compile the train step for this config and batch, run 1 + `iters` steps, time them.
    `model_flops`: add `_model_flops` (after the timing; a batch search adds it to its best)."""
    import jax
    import numpy as np

    from benchmarks.input_pipeline import compile_train_step

    call, compiled, info = compile_train_step(cfg, batch)
    t0 = time.perf_counter()
    metrics = jax.block_until_ready(call())
    first = time.perf_counter() - t0
    load = common.load_snapshot()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        metrics = jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    s = common.summarize(times)
    loss = float(np.asarray(metrics["loss"]))
    return {
        "batch": batch, "image_size": cfg.model.image_size, "tokens": cfg.model.max_tokens,
        "compile_s": info["lower_s"] + info["compile_s"], "lower_s": info["lower_s"],
        "compile_cache_hit": info["cache_hit"],
        "xla_compile_s": info["compile_s"], "xla_flops_per_step": info["flops"],
        "hlo_flops_per_step": info["hlo_flops"], "hlo_flops_source": info["hlo_flops_source"],
        "first_step_s": first, "step_median_ms": s["median_s"] * 1e3,
        "step_p90_ms": s["p90_s"] * 1e3, "step_min_ms": s["min_s"] * 1e3, "n": s["n"],
        "images_per_s": batch / s["median_s"], "loss": loss,
        "finite": bool(np.isfinite(loss) and float(np.asarray(metrics["finite"])) > 0),
        "xla_memory": common.memory_of(compiled), "device_memory": common.device_memory(),
        "load_before": load, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **(_model_flops(cfg, batch) if model_flops else {}),
    }


def train_section(
    cfg: Any, configs: Sequence[tuple[str, bool]], batch: int, iters: int, search: bool,
    max_batch: int, device_kind: str,
) -> list[dict[str, Any]]:
    """Train-step throughput per (dtype, remat); with `search`, the largest batch that fits."""
    entries: list[dict[str, Any]] = []
    for dtype, remat in configs:
        c = _with_remat(cfg, dtype, remat)
        tried: list[dict[str, Any]] = []
        best, b = None, batch
        while b <= max_batch:
            try:
                best = train_one(c, b, iters, model_flops=False)
            except Exception as err:  # noqa: BLE001 - only out-of-memory ends the search
                if not (search and _is_oom(err)) or best is None and b == batch:
                    raise
                tried.append({"batch": b, "error": "out of memory"})
                gc.collect()
                break
            tried.append({"batch": b, "images_per_s": best["images_per_s"]})
            print(f"  train {dtype:8s} remat {_remat_label(remat):5s} batch {b}: compile "
                  f"{best['compile_s']:.1f} s, step {best['step_median_ms']:.1f} ms, "
                  f"{best['images_per_s']:.2f} img/s", flush=True)
            if not search:
                break
            b *= 2
            gc.collect()
        assert best is not None
        entries.append({"dtype": dtype, "remat": remat, "batch_search": search,
                        "batches_tried": tried, **best, **_model_flops(c, best["batch"])})
    _add_mfu(entries, device_kind)
    return entries


def _add_mfu(entries: list[dict[str, Any]], device_kind: str) -> None:
    """MFU (model FLOPs: the no-remat step's) and HFU (the step's own count), from the FLOPs of
    the HLO before optimization (`common.compile_jax`: XLA:GPU's compiled count leaves out the
    cuDNN / cuBLAS calls). A remat step's model FLOPs are a no-remat entry's of its dtype per
    image x its batch, else its own traced count without remat (`no_remat_flops_per_step`);
    only an entry with neither (an older result) falls back to its own count, and says so."""
    gpu = device_kind.lower() != "cpu"

    def flops(e: dict[str, Any]) -> float:
        return e.get("hlo_flops_per_step") or e["xla_flops_per_step"]

    per_image = {e["dtype"]: flops(e) / e["batch"] for e in entries if not e["remat"]}
    for e in entries:
        own = flops(e)
        if e["dtype"] in per_image:
            model_flops = per_image[e["dtype"]] * e["batch"]
            source = "no-remat step of this dtype, per image x batch"
        elif e.get("no_remat_flops_per_step"):
            model_flops, source = e["no_remat_flops_per_step"], "this step without remat (jaxpr)"
        else:
            model_flops, source = own, "this step (remat included)"
        e["model_flops_per_step"], e["model_flops_source"] = model_flops, source
        peak, which = peak_flops(device_kind, e["dtype"]) if gpu else (None, "n/a on CPU")
        e["peak_flops"], e["peak_flops_source"] = peak, which
        seconds = e["step_median_ms"] / 1e3
        e["mfu"] = model_flops / seconds / peak if peak else None
        e["hfu"] = own / seconds / peak if peak else None
        e["achieved_tflops"] = model_flops / seconds / 1e12


def memory_section(
    cfg: Any, dtypes: Sequence[str], targets: Sequence[tuple[int, bool]], gpu: bool,
    time_iters: int | None = None,
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Does the train step fit one 80 GB GPU at the target (batch, remat)s? Per dtype: XLA's
    `memory_analysis()` of the compiled step (compile only; every backend) and, on a GPU, one
    real step (an out-of-memory error is a result, not a crash). With `time_iters`, each row
    also runs and times the step (`train_one`; on any backend) and keeps it under `"step"`, so
    the train section can reuse it without compiling the step again. `on_row(rows so far)` runs
    after each row (the caller writes a partial result: a train step compile can take minutes)."""
    import jax

    from benchmarks.input_pipeline import compile_train_step, saved_per_image

    entries = []
    saved: dict[tuple[str, bool], int] = {}
    for dtype in dtypes:
        for batch, remat in targets:
            row_cfg = _as_on_gpu(_with_remat(cfg, dtype, remat))
            if (dtype, remat) not in saved:
                saved[dtype, remat] = saved_per_image(row_cfg)
            entry: dict[str, Any] = {
                "dtype": dtype, "batch": batch, "remat": remat,
                "image_size": cfg.model.image_size, "limit_bytes": TARGETS["gpu_memory_bytes"],
                "xla_memory": None, "estimate_bytes": None,
                "saved_for_backward_per_image_bytes": saved[dtype, remat],
                "conv_impl": row_cfg.model.decoder.conv_impl,
                "dot_results": row_cfg.model.dot_results,
            }
            try:  # on a GPU, running out of memory (compile, transfer or step) is a result
                if time_iters is not None:
                    step = train_one(row_cfg, batch, time_iters)
                    xm = step["xla_memory"]
                    entry.update(compile_s=step["compile_s"], xla_memory=xm,
                                 compile_cache_hit=step["compile_cache_hit"],
                                 estimate_bytes=xm["estimate_bytes"] if xm else None,
                                 ran=True, device_memory=step["device_memory"], step=step)
                else:
                    call, compiled, info = compile_train_step(row_cfg, batch)
                    xm = common.memory_of(compiled)
                    entry.update(compile_s=info["lower_s"] + info["compile_s"], xla_memory=xm,
                                 estimate_bytes=xm["estimate_bytes"] if xm else None,
                                 compile_cache_hit=info["cache_hit"])
                    if gpu:
                        jax.block_until_ready(call())
                        entry["ran"], entry["device_memory"] = True, common.device_memory()
                    del call, compiled
            except Exception as err:  # noqa: BLE001 - only out-of-memory is a result
                if not (gpu and _is_oom(err)):
                    raise
                entry["ran"], entry["error"] = False, "out of memory"
            gc.collect()
            entries.append(entry)
            est = entry["estimate_bytes"]
            print(f"  memory  {dtype:8s} remat {_remat_label(remat):5s} batch {batch}: XLA "
                  f"estimate {est / 2**30 if est else float('nan'):.1f} GiB; saved for the "
                  f"backward {saved[dtype, remat] / 2**30:.3f} GiB per image"
                  + (f", step {'ran' if entry['ran'] else 'out of memory'}" if "ran" in entry
                     else "")
                  + (f", {entry['step']['images_per_s']:.2f} img/s" if "step" in entry else ""),
                  flush=True)
            if on_row is not None:
                on_row(entries)
    return entries


def split_memory_rows(
    rows: Sequence[dict[str, Any]], device_kind: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(memory rows without their timed steps, train-section entries made of those steps, with
    MFU): the throughput at the memory targets' batches, with no second compile of the step."""
    memory = [{k: v for k, v in e.items() if k != "step"} for e in rows]
    train = [{"dtype": e["dtype"], "remat": e["remat"], "batch_search": False,
              "batches_tried": [{"batch": e["batch"],
                                 "images_per_s": e["step"]["images_per_s"]}],
              "source": "memory section (--train-at-memory-targets)", **e["step"]}
             for e in rows if "step" in e]
    _add_mfu(train, device_kind)
    return memory, train


# ------------------------------------------------------------------------------------------
# CPU: ours vs PyTorch
# ------------------------------------------------------------------------------------------


def cpu_vs_torch(
    cfg: Any, config_name: str, quick: bool, iters: int, compiled_f32_b1: Any, shapes: Any,
) -> dict[str, Any]:
    """Backbones (Swin, BERT) and full VIPA forward vs PyTorch backbones, batch 1 float32."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return {"skipped": "torch / transformers not installed"}
    if config_name != "refcoco" and not quick:
        return {"skipped": "the PyTorch baselines are Swin-B + BERT-base: use --config refcoco"}
    from benchmarks import backbones, model

    bb = backbones.run(quick=quick, iters=iters, write=False)

    def pair(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
        return {"ours_median_ms": ours["median_s"] * 1e3, "ours_p90_ms": ours["p90_s"] * 1e3,
                "torch_median_ms": ref["median_s"] * 1e3, "torch_p90_ms": ref["p90_s"] * 1e3,
                "n": ours["n"], "ratio_of_min_times": ours["min_s"] / ref["min_s"]}

    out: dict[str, Any] = {"backbones": {
        r["name"]: {**pair(r["jax"], r["torch"]), "ratio": r["ratio_ours_over_torch"],
                    "ratio_of_min_times": r["ratio_of_min_times"],
                    "max_abs_diff": r["max_abs_diff"]}
        for r in bb["results"]}}
    if compiled_f32_b1 is None:
        out["full_forward"] = {"skipped": "needs the float32 batch-1 inference entry"}
        return out
    # The same forward with the other decoder 3x3 conv (XLA's when the config's resolves to
    # Winograd here, as the default 'auto' does on CPU; Winograd, the tile picked by map size,
    # otherwise), timed side by side; compiled for the abstract variables only.
    from benchmarks.input_pipeline import forward_setup
    from vipa_jax.models.decoder import resolve_conv_impl

    configured = cfg.model.decoder.conv_impl
    impl = resolve_conv_impl(configured)  # float32 here
    other = "xla" if impl.startswith("winograd") else "winograd"
    ocfg = _with(cfg, dtype="float32")
    ocfg.model.decoder.conv_impl = other
    fwd, args = forward_setup(ocfg, 1, shapes)
    variants = {other: (common.compile_jax(fwd, *args)[0], ocfg.model)}
    t = model.time_forward(compiled_f32_b1, shapes, _with(cfg, dtype="float32").model, iters,
                           True, quick, variants)
    out["full_forward"] = {**pair(t["vipa_jax"], t["torch_swin_bert"]),
                           "ratio": t["ratio_vipa_over_torch_backbones"],
                           "conv_impl": impl, "conv_impl_config": configured,
                           "load_before": t["load_before"]}
    out[f"full_forward_{other}"] = {
        **pair(t[f"vipa_jax:{other}"], t["torch_swin_bert"]),
        "ratio": t[f"ratio_vipa:{other}_over_torch_backbones"], "conv_impl": other}
    return out


# ------------------------------------------------------------------------------------------
# figures: one row per number, with its labels and target
# ------------------------------------------------------------------------------------------


def _ms(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.3f}"


def _bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _status(value: float | None, target: float | None, higher_is_better: bool, gpu: bool,
            gpu_target: bool) -> str:
    if value is None or target is None:
        return "n/a"
    if gpu_target and not gpu:
        return "n/a (GPU target)"
    ok = value >= target if higher_is_better else value <= target
    return "meets" if ok else "misses"


def figures(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every reported number as a labelled row: figure, dtype, batch, size, device, value, p90,
    target, status."""
    device = result["device_kind"]
    gpu = result["backend"] == "gpu"
    rows: list[dict[str, Any]] = []

    def add(fig: str, dtype: str, batch: Any, size: Any, value: str, p90: str = "",
            target: str = "", status: str = "") -> None:
        rows.append({"figure": fig, "dtype": dtype, "batch": batch, "image_size": size,
                     "device": device, "value": value, "p90": p90, "target": target,
                     "status": status or "n/a"})

    def add_compile(fig: str, e: dict[str, Any]) -> None:
        """A compile-time row; a program loaded from the compilation cache is no compile time."""
        hit = e.get("compile_cache_hit")
        add(fig, e["dtype"], e["batch"], e["image_size"], f"{e['compile_s']:.1f} s",
            "loaded from the compilation cache" if hit else "",
            f"<= {TARGETS['gpu_compile_s']:g} s (GPU)",
            "n/a (cache hit)" if hit else
            _status(e["compile_s"], TARGETS["gpu_compile_s"], False, gpu, True))

    for e in result.get("inference", []):
        tgt = TARGETS["gpu_inference_ms_batch1"].get(e["dtype"]) if e["batch"] == 1 else None
        add("inference latency (median)", e["dtype"], e["batch"], e["image_size"],
            f"{_ms(e['median_ms'])} ms", f"{_ms(e['p90_ms'])} ms",
            f"<= {tgt:g} ms (H100)" if tgt else "",
            _status(e["median_ms"], tgt, False, gpu, True))
        add_compile("inference compile", e)
    for e in result.get("train", []):
        name = f"train, remat {_remat_label(e['remat'])}"
        add(f"{name}: throughput", e["dtype"], e["batch"], e["image_size"],
            f"{e['images_per_s']:.2f} img/s")
        add(f"{name}: step time (median)", e["dtype"], e["batch"], e["image_size"],
            f"{_ms(e['step_median_ms'])} ms", f"{_ms(e['step_p90_ms'])} ms")
        add_compile(f"{name}: compile", e)
        dm = e.get("device_memory")
        peak = (f"{dm['peak_bytes_in_use'] / 2**30:.2f} GiB (process peak)"
                if dm and "peak_bytes_in_use" in dm else "n/a (CPU: no memory_stats)")
        xm = e.get("xla_memory")
        add(f"{name}: peak device memory", e["dtype"], e["batch"], e["image_size"], peak,
            f"XLA estimate {xm['estimate_bytes'] / 2**30:.2f} GiB" if xm else "")
        mfu_target = TARGETS["gpu_train_mfu_bfloat16"] if e["dtype"] == "bfloat16" else None
        add(f"{name}: MFU", e["dtype"], e["batch"], e["image_size"],
            f"{100 * e['mfu']:.1f}%" if e.get("mfu") is not None else "n/a (CPU)",
            f"HFU {100 * e['hfu']:.1f}%" if e.get("hfu") is not None else "",
            f">= {100 * mfu_target:.0f}% (GPU)" if mfu_target else "",
            _status(e.get("mfu"), mfu_target, True, gpu, True))
    limit = TARGETS["gpu_memory_bytes"]
    for e in result.get("memory", []):
        est = e.get("estimate_bytes")
        if gpu:
            fits = e.get("ran", False) and est is not None and est <= limit
            status = "meets" if fits else "misses"
            note = "step ran" if e.get("ran") else "step out of memory"
        else:
            status = "n/a (GPU target)"
            note = ("XLA:CPU estimate; jax.checkpoint does not lower it (jax#19822)"
                    if e["remat"] else "XLA:CPU estimate")
        add(f"train memory, remat {_remat_label(e['remat'])} (XLA estimate)", e["dtype"],
            e["batch"], e["image_size"], _bytes(est) if est is not None else "n/a",
            note, f"<= {limit / 1e9:g} GB (one GPU)", status)
        per_image = e.get("saved_for_backward_per_image_bytes")
        if per_image is not None:
            add(f"saved for backward, remat {_remat_label(e['remat'])} (JAX count)",
                e["dtype"], e["batch"], e["image_size"],
                f"{_bytes(per_image * e['batch'])} ({_bytes(per_image)} per image)",
                "before XLA; every backend")
    cvt = result.get("cpu_vs_torch") or {}
    busy = (result.get("load_start") or {}).get("busy_other_processes", 0) > 0
    caveat = " (machine busy: unreliable)" if busy else ""
    for name, r in (cvt.get("backbones") or {}).items():
        add(f"{name} forward: ours / PyTorch", "float32", 1, result["inference_image_size"],
            f"{r['ratio']:.2f}x ({_ms(r['ours_median_ms'])} vs {_ms(r['torch_median_ms'])} ms)",
            _min_note(r), target=f"<= {TARGETS['cpu_backbones_over_torch']:g}x",
            status=_status(r["ratio"], TARGETS["cpu_backbones_over_torch"], False, gpu, False)
            + caveat)
    for key in ("full_forward", "full_forward_winograd", "full_forward_xla"):
        ff = cvt.get(key) or {}
        if "ratio" not in ff:
            continue
        impl = ff.get("conv_impl", "xla")
        if ff.get("conv_impl_config", impl) != impl:  # the default 'auto', resolved
            impl = f"{ff['conv_impl_config']}: {impl}"
        add("full VIPA forward / PyTorch Swin+BERT"
            + (f" (decoder.conv_impl={impl})" if key != "full_forward" or impl != "xla" else ""),
            "float32", 1, result["inference_image_size"],
            f"{ff['ratio']:.2f}x ({_ms(ff['ours_median_ms'])} vs {_ms(ff['torch_median_ms'])} ms)",
            _min_note(ff), target=f"<= {TARGETS['cpu_full_forward_over_torch_backbones']:g}x",
            status=_status(ff["ratio"], TARGETS["cpu_full_forward_over_torch_backbones"], False,
                           gpu, False) + caveat)
    return rows


def _min_note(r: dict[str, Any]) -> str:
    """The ratio of the fastest runs, next to a ratio of medians (less sensitive to load; older
    results may lack it)."""
    return f"min/min {r['ratio_of_min_times']:.2f}x" if "ratio_of_min_times" in r else ""


FIG_COLUMNS = ("figure", "dtype", "batch", "image_size", "device", "value", "p90", "target",
               "status")


def print_figures(result: dict[str, Any]) -> None:
    rows = [[r[c] for c in FIG_COLUMNS] for r in figures(result)]
    common.print_table(rows, ["figure", "dtype", "batch", "size", "device", "value", "p90 / note",
                              "target", "status"],
                       title=f"VIPA benchmark suite ({result['config']}) on "
                             f"{result['machine_info']['machine']}, {result['device_kind']}, "
                             f"{result['iters']} timed runs each")


# ------------------------------------------------------------------------------------------
# RESULTS.md from the JSON results
# ------------------------------------------------------------------------------------------


def section_key(r: dict[str, Any]) -> str:
    """Which RESULTS.md section a result belongs to: 'gpu', or 'cpu/<ISA>' (one CPU section per
    vector ISA, since XLA:CPU vs PyTorch ratios differ by ~2x between AVX2 and AVX-512 hosts;
    results written before the ISA was recorded go to 'cpu/unrecorded')."""
    if r["backend"] != "cpu":
        return r["backend"]
    return f"cpu/{r['machine_info'].get('cpu_isa', 'unrecorded')}"


def _results(results_dir: str, benchmark: str = "run") -> list[dict[str, Any]]:
    """Every non-quick `<benchmark>-*.json` result of the whole model in a folder (a profile of
    one `--part` is left out), with its file name under `_file`."""
    out = []
    for path in glob.glob(os.path.join(results_dir, f"{benchmark}-*.json")):
        with open(path) as f:
            r = json.load(f)
        if r.get("benchmark") != benchmark or r.get("quick") or r.get("part", "total") != "total":
            continue
        r["_file"] = os.path.basename(path)
        out.append(r)
    return out


def gpu_runs(results_dir: str) -> list[dict[str, Any]]:
    """Every non-quick GPU `run-*.json` result, newest first: a short lease measures only some
    sections, so RESULTS.md shows each lease's run, not only the newest."""
    runs = [r for r in _results(results_dir) if section_key(r) == "gpu"]
    return sorted(runs, key=lambda r: r["machine_info"]["time_utc"], reverse=True)


def latest_results(results_dir: str, benchmark: str = "run") -> dict[str, dict[str, Any]]:
    """{`section_key`: the newest non-quick `<benchmark>-*.json` result} in a folder (`run`
    results of this suite, or `profile` results of `benchmarks.profile` of the whole model, not
    of one `--part`, keyed `<section_key>#<mode>`: the newest inference and train profiles)."""
    latest: dict[str, dict[str, Any]] = {}
    for r in _results(results_dir, benchmark):
        b = section_key(r) + (f"#{r.get('mode', 'inference')}" if benchmark == "profile" else "")
        if b not in latest or r["machine_info"]["time_utc"] > latest[b]["machine_info"]["time_utc"]:
            latest[b] = r
    return latest


def _md_table(rows: list[dict[str, Any]]) -> list[str]:
    head = ["figure", "dtype", "batch", "size", "value", "p90 / note", "target", "status"]
    cols = [c for c in FIG_COLUMNS if c != "device"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return out


def _md_commit(mi: dict[str, Any]) -> str:
    """A result's commit for RESULTS.md: '`abc1234`', '(with uncommitted changes)' added when
    the tree was dirty."""
    return f"`{mi['git_commit']}`" + (" (with uncommitted changes)" if mi.get("git_dirty") else "")


def _md_section(r: dict[str, Any]) -> list[str]:
    mi = r["machine_info"]
    versions = ", ".join(f"{k} {mi[k]}" for k in ("python", "jax", "jaxlib", "flax", "torch")
                         if mi.get(k))
    lines = [
        f"Machine `{mi['machine']}`: {r['device_kind']}"
        + (f" ({mi['processor']}" + (f", {mi['cpu_id']}" if mi.get("cpu_id") else "")
           + f", {mi.get('cpu_isa', 'vector ISA not recorded')}, {mi['cpus_used']} of "
           f"{mi['cpu_count']} CPUs)"
           if r["backend"] == "cpu" else f" (host: {mi['processor']})") + ".",
        f"Versions: {versions}. Commit {_md_commit(mi)}, {mi['time_utc']}; "
        f"file `benchmarks/results/{r['_file']}`.",
        f"Config `{r['config']}`; {r['iters']} timed runs per figure; command: "
        f"`{r['command']}`.",
        f"Load at the start (1-min load average, other busy processes): "
        f"{mi.get('loadavg_1_5_15', ['?'])[0]}, {r['load_start']['busy_other_processes']}.",
        "",
        *_md_table(figures(r)),
    ]
    notes = list(r.get("notes") or [])
    if r.get("partial"):
        done = r["partial"] if " " in r["partial"] else f"the {r['partial']} section"
        notes.insert(0, f"Partial run: it stopped after {done} (e.g. a time limit); what came "
                        "after it is missing.")
    if r["load_start"].get("busy_other_processes", 0) > 0:
        notes.append("Other processes were busy during this run: absolute times are inflated, and "
                     "PyTorch's thread pool suffers far more from contention than XLA's, so the "
                     "ours/PyTorch ratios favour us; rerun on an idle machine for those ratios.")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return lines


def _md_profile_row(x: dict[str, Any]) -> str:
    """A profile table row; ms to three significant digits below 100, whole ms above."""
    ms = f"{x['ms']:.3g}" if x["ms"] < 100 else f"{x['ms']:.0f}"
    return f"| {x['name']} | {ms} | {x['percent']:.1f}% |"


def _md_profile(p: dict[str, Any], rows: int = 8) -> list[str]:
    mi = p["machine_info"]
    lines = [
        f"Where the time goes (`python -m benchmarks.profile`, file `benchmarks/results/"
        f"{p['_file']}`): {p.get('config', 'refcoco')} {p['mode']}, batch {p['batch']}, "
        f"{p['image_size']}x{p['image_size']}, "
        f"{p['dtype']}, on {p['device_kind']}, commit `{mi['git_commit']}`; wall median "
        f"{p['wall_median_ms']:.1f} ms, traced op time {p['op_time_ms']:.2f} ms per call"
        + (f" (and {p['unattributed_device_ms']:.2f} ms of device time matched to no "
           "instruction)" if p.get("unattributed_device_ms") else "") + ".",
    ]
    if p["op_time_ms"] < 0.5 * p["wall_median_ms"]:
        lines += ["", f"Only {100 * p['op_time_ms'] / p['wall_median_ms']:.0f}% of the wall time "
                  "is attributed to HLO instructions (the shares below are of that part): "
                  + ("XLA's command buffers were on, and kernels replayed from a CUDA graph "
                     "most likely carry no instruction (`benchmarks.profile` now turns them off "
                     "on a GPU)."
                     if p["backend"] == "gpu" and "command_buffer" not in p.get("xla_flags", "")
                     else "see `unattributed_top` in the JSON.")]
    lines += [
        "",
        "| module | ms per call | share |", "|---|---|---|",
        *[_md_profile_row(x) for x in p["by_module"][:rows]],
        "", "| op kind | ms per call | share |", "|---|---|---|",
        *[_md_profile_row(x) for x in p["by_kind"][:5]],
    ]
    return lines


def _md_gpu_aot(results_dir: str) -> list[str]:
    """The newest non-quick `benchmarks.gpu_aot` result per (target, dtype, batch, remat, set of
    variants): a run comparing other variants does not hide an earlier one."""
    latest: dict[tuple[Any, ...], dict[str, Any]] = {}
    for path in glob.glob(os.path.join(results_dir, "gpu_aot-*.json")):
        with open(path) as f:
            r = json.load(f)
        if r.get("benchmark") != "gpu_aot" or r.get("quick"):
            continue
        r["_file"] = os.path.basename(path)
        key = (r["target"], r["dtype"], r["batch"], r["remat"], tuple(sorted(r["variants"])))
        if key not in latest or r["machine_info"]["time_utc"] > latest[key]["machine_info"][
                "time_utc"]:
            latest[key] = r
    if not latest:
        return []
    lines = [
        "## XLA:GPU programs compiled without a GPU", "",
        "`python -m benchmarks.gpu_aot`: the train step compiled by XLA:GPU for a GPU spec on a "
        "machine without one (no autotuning, nothing run). Kernels: launches per step (fusions "
        "and library calls); kernel I/O: each kernel's operands and results, summed, and the "
        "time moving them takes at the spec's memory bandwidth (a floor for the memory-bound "
        "kernels, not a prediction); memory: XLA's buffer assignment (arguments + outputs + "
        "temporaries - donated), what the GPU memory rows report. No measured times.", "",
    ]
    for key in sorted(latest):
        r = latest[key]
        mi = r["machine_info"]
        lines += [
            f"{r['device_kind']} spec (`{r['target']}`), `{r['config']}`, batch {r['batch']}, "
            f"{r['dtype']}, remat {'on' if r['remat'] else 'off'}; commit {_md_commit(mi)}"
            + (f"; `XLA_FLAGS={r['xla_flags']}`" if r.get("xla_flags") else "")
            + f", {mi['time_utc']}; file `benchmarks/results/{r['_file']}`.", "",
            "| variant | overrides | kernels | vs " + str(r["reference"]) + " | GEMM | cuDNN "
            "attention | softmax | reduce | transpose | kernel I/O | XLA memory |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        ref = r["variants"].get(r["reference"] or "", {})
        for name, e in r["variants"].items():
            over = ", ".join(f"{k}={v}" for k, v in e.get("overrides", {}).items()) or "-"
            if "kernels" not in e:
                lines.append(f"| {name} | {over} | error: {e.get('error', '?')[:80]} |"
                             " | | | | | | | |")
                continue
            g = e["kernel_groups"]
            lines.append(f"| {name} | {over} | {e['kernels']} | "
                         f"{e['kernels'] - ref.get('kernels', e['kernels']):+d} | {g['gemm']} | "
                         f"{g.get('attention', 0)} | {g['softmax']} | {g['reduce']} | "
                         f"{g['transpose']} | {_io_cell(e)} | {e['memory_gib']:.1f} GiB |")
        lines.append("")
    return lines


def _md_compile_phases(results_dir: str, passes: int = 3) -> list[str]:
    """Every `benchmarks.compile_phases` result: each program's compiler phases, its HLO pass
    time and its slowest passes."""
    lines: list[str] = []
    for path in sorted(glob.glob(os.path.join(results_dir, "compile_phases-*.json"))):
        with open(path) as f:
            r = json.load(f)
        if r.get("benchmark") != "compile_phases" or not r.get("modules"):
            continue
        mi = r["machine_info"]
        command = " ".join(r["command"]) if r.get("command") else f"(log {r.get('log')})"
        lines += [
            f"`{command}` on {mi['machine']} ({mi.get('processor', '?')}, {mi['cpu_count']} "
            f"cores{', ' + r['gpu'] if r.get('gpu') else ''}); commit {_md_commit(mi)}, "
            f"{mi['time_utc']}; file `benchmarks/results/{os.path.basename(path)}`.", "",
            "| program | compiler phases | HLO passes | slowest passes |", "|---|---|---|---|"]
        for name, m in r["modules"].items():
            phases = ", ".join(f"{k.replace(' for <module>', '').replace('<module>', '·')} "
                               f"{v:.1f} s"
                               for k, v in m["phases_s"].items() if v >= 0.05) or "-"
            slow = ", ".join(f"{k} {v:.1f} s" for k, v in list(m["passes_s"].items())[:passes])
            lines.append(f"| {name} | {phases} | {m['pass_total_s']:.1f} s "
                         f"({m['pass_runs']} runs) | {slow} |")
        lines.append("")
    if lines:
        lines = ["## XLA compile time by phase", "",
                 "`python -m benchmarks.compile_phases -- COMMAND`: XLA's own timers for each "
                 "program COMMAND compiled (a program compiled again is `name#2`, ...). "
                 "Phases are XLA's compiler stages (XLA:GPU: HLO passes, then the backend's "
                 "kernel emission and PTX compilation; autotuning on a GPU); HLO passes: the "
                 "sum over every pass run.", "", *lines]
    return lines


def _io_cell(entry: dict[str, Any]) -> str:
    """'187.7 GB (39.1 ms)': a gpu_aot variant's kernel I/O and its time at the spec's
    bandwidth; '-' for results written before gpu_aot counted it."""
    if entry.get("io_bytes") is None:
        return "-"
    ms = entry.get("io_ms")
    return f"{entry['io_bytes'] / 1e9:.1f} GB" + (f" ({ms:.1f} ms)" if ms is not None else "")


def write_markdown(results_dir: str, path: str) -> str:
    """Regenerate RESULTS.md from the newest CPU and GPU results in `results_dir`."""
    latest = latest_results(results_dir)
    profiles = latest_results(results_dir, "profile")
    lines = [
        "# VIPA benchmark results",
        "",
        "Generated by `python -m benchmarks.run` from `benchmarks/results/run-*.json` (do not "
        "edit by hand; `python -m benchmarks.run --md-only` regenerates it). Methodology: the "
        "docstring of `benchmarks/run.py`. Targets (issue 8): GPU inference <= 41 ms float32 / "
        "<= 15 ms bfloat16 at batch 1 on one H100, training >= 40% MFU in bfloat16, compile "
        "<= 60 s; CPU full forward <= 1.2x PyTorch Swin-B+BERT, backbones <= 0.8x PyTorch.",
        "",
    ]
    cpu_keys = sorted(k for k in latest if k.startswith("cpu/")) or ["cpu"]
    for key in ["gpu", *cpu_keys]:
        backend, _, isa = key.partition("/")
        title = backend.upper() + (f" ({'ISA not recorded' if isa == 'unrecorded' else isa})"
                                   if isa else "")
        lines += [f"## {title}", ""]
        if key in latest:
            lines += _md_section(latest[key])
            for older in gpu_runs(results_dir)[1:] if key == "gpu" else []:
                lines += ["", "An earlier GPU run (figures the newer ones did not measure "
                          "again):", "", *_md_section(older)]
        else:
            lines.append(f"No {title} run yet: `python -m benchmarks.run --device {backend}`.")
        for mode in ("inference", "train"):
            if f"{key}#{mode}" in profiles:
                lines += ["", *_md_profile(profiles[f"{key}#{mode}"])]
        lines.append("")
    lines += _md_gpu_aot(results_dir)
    lines += _md_compile_phases(results_dir)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


def run(a: argparse.Namespace) -> dict[str, Any]:
    import jax

    backend = jax.default_backend()
    if a.device == "gpu" and backend != "gpu":
        raise SystemExit(f"--device gpu but JAX's backend is {backend!r}")
    device_kind = jax.devices()[0].device_kind
    gpu = backend == "gpu"
    cfg = load_config(a.config, a.quick)
    iters = a.iters or (2 if a.quick else 20 if gpu else 5)
    infer_batches = a.infer_batch or ([1] if a.quick or not gpu else [1, 8])
    train_batch = a.train_batch or (2 if a.quick or not gpu else 8)
    search = gpu and not a.no_search
    train_configs = a.train_configs or ([("bfloat16", True)] if a.quick else
                                        [(d, r) for r in (False, True) for d in a.dtypes])
    config_name = "synthetic:test" if a.quick else a.config
    notes: list[str] = []
    print(f"{config_name} on {backend} ({device_kind}); {iters} timed runs", flush=True)

    result: dict[str, Any] = {
        "quick": a.quick, "config": config_name, "backend": backend, "device_kind": device_kind,
        "iters": iters, "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
        "targets": TARGETS, "load_start": common.load_snapshot(),
        "inference_image_size": cfg.model.image_size,
    }
    date = time.strftime("%Y-%m-%d", time.gmtime())
    # CPU results carry the vector ISA in their name: an AVX2 and an AVX-512 VM share a name.
    tag = f"{common.device_tag(backend, device_kind)}-{date}"

    earlier = earlier_result(common.result_path("run", a.out, tag), result)

    def checkpoint(section: str) -> None:
        # A partial result after every section: a run cut short (a device's time limit) keeps
        # what it measured. `partial` names the last finished section; the final write drops it.
        common.write_result("run", {**merge_earlier(result, earlier, []), "partial": section,
                                    "notes": notes}, a.out, tag=tag)

    compiled, shapes = {}, None
    if not a.no_infer:
        result["inference"], compiled, shapes = inference_section(
            cfg, a.dtypes, infer_batches, iters)
        checkpoint("inference")
    if not a.no_memory:
        targets = a.memory_targets or (MEMORY_TARGETS_QUICK if a.quick else MEMORY_TARGETS)
        mem_dtypes = ["bfloat16"] if a.quick else (a.memory_dtypes or a.dtypes)

        def memory_rows(rows: list[dict[str, Any]]) -> None:
            result["memory"], train = split_memory_rows(rows, device_kind)
            if a.train_at_memory_targets:
                result["train"] = train
            checkpoint(f"memory row {len(rows)} of {len(targets) * len(mem_dtypes)}")

        memory_section(cfg, mem_dtypes, targets, gpu,
                       iters if a.train_at_memory_targets else None, memory_rows)
        if not gpu:
            notes.append("Train memory on CPU: XLA:CPU's buffer assignment of the compiled step, "
                         "an estimate of what a GPU needs; XLA:CPU also ignores jax.checkpoint "
                         "for memory (jax#19822), so the remat rows only count on a GPU.")
        checkpoint("memory")
    if not a.no_train and not a.train_at_memory_targets:
        tcfg = copy.deepcopy(cfg)
        if a.train_image_size:
            tcfg.model.image_size = a.train_image_size
            notes.append(f"train step at {a.train_image_size}x{a.train_image_size}, not the "
                         f"config's {cfg.model.image_size}x{cfg.model.image_size}.")
        result["train"] = train_section(tcfg, train_configs, train_batch, iters, search,
                                        a.max_train_batch, device_kind)
        checkpoint("train")
        if not gpu:
            notes.append("CPU: fixed train batch (no search); peak device memory n/a because "
                         "the CPU backend has no memory_stats(); the XLA estimate is "
                         "memory_analysis() of the step; MFU n/a on CPU.")
    if gpu:
        result["cpu_vs_torch"] = {"skipped": "CPU-only section"}
    elif a.no_torch:
        result["cpu_vs_torch"] = {"skipped": "--no-torch"}
    else:
        result["cpu_vs_torch"] = cpu_vs_torch(cfg, a.config, a.quick, iters,
                                              compiled.get(("float32", 1)), shapes)
    result = merge_earlier(result, earlier, notes)
    if result.get("train"):
        _add_mfu(result["train"], device_kind)  # again: merged rows may add a no-remat step
    if "skipped" in result["cpu_vs_torch"]:
        notes.append(f"ours vs PyTorch: {result['cpu_vs_torch']['skipped']}.")
    result["notes"] = notes
    result["load_end"] = common.load_snapshot()
    print_figures({**result, "machine_info": common.machine_info()})
    for n in notes:
        print("note:", n)
    result["path"] = common.write_result("run", result, a.out, tag=tag)
    print("wrote", result["path"])
    return result


MERGED_SECTIONS = ("inference", "memory", "train", "cpu_vs_torch")


def earlier_result(path: str, result: dict[str, Any]) -> dict[str, Any] | None:
    """Today's earlier result in the file this run will write, if it is the same commit, config
    and device (so a run split over calls, e.g. `--no-train` then `--no-infer --no-memory`
    within a device's per-call time limit, ends as one result); else None."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return None
    same = (old.get("benchmark") == "run" and not old.get("quick")
            and not old.get("machine_info", {}).get("git_dirty")
            and old.get("machine_info", {}).get("git_commit") == common.machine_info()["git_commit"]
            and all(old.get(k) == result[k] for k in ("config", "backend", "device_kind")))
    return old if same else None


def merge_earlier(result: dict[str, Any], earlier: dict[str, Any] | None,
                  notes: list[str]) -> dict[str, Any]:
    """`result` plus the sections it skipped that `earlier` has (noted in `notes`)."""
    if earlier is None:
        return result
    out = dict(result)
    taken = []
    for sec in MERGED_SECTIONS:
        mine, theirs = out.get(sec), earlier.get(sec)
        if sec == "train" and mine and theirs:  # both timed steps: keep every (dtype, remat)
            have = {(e["dtype"], e["remat"]) for e in mine}
            extra = [e for e in theirs if (e["dtype"], e["remat"]) not in have]
            if extra:
                out[sec] = [*mine, *extra]
                taken.append("train (" + ", ".join(
                    f"{e['dtype']} remat {_remat_label(e['remat'])}" for e in extra) + ")")
            continue
        skipped = mine is None or (isinstance(mine, dict) and "skipped" in mine)
        if skipped and theirs and not (isinstance(theirs, dict) and "skipped" in theirs):
            out[sec] = theirs
            taken.append(sec)
    if taken:
        notes.append(f"{', '.join(taken)}: from the earlier run of the same commit at "
                     f"{earlier['machine_info'].get('time_utc')} ({earlier.get('command')}).")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--config", choices=("refcoco", "synthetic"), default="refcoco")
    p.add_argument("--quick", action="store_true", help="tiny synthetic:test model, 2 iterations")
    p.add_argument("--iters", type=int, default=None,
                   help="timed runs per figure (default: 20 on GPU, 5 on CPU, 2 with --quick)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--infer-batch", type=int, nargs="+", default=None,
                   help="inference batches (default: 1 8 on GPU, 1 on CPU)")
    p.add_argument("--train-batch", type=int, default=None,
                   help="train batch (CPU, default 2) or the GPU search's first batch (default 8)")
    p.add_argument("--max-train-batch", type=int, default=1024)
    p.add_argument("--no-search", action="store_true", help="GPU: time --train-batch only")
    p.add_argument("--train-image-size", type=int, default=None,
                   help="train step at this size instead of the config's (labelled)")
    p.add_argument("--train-configs", nargs="+", type=train_config, default=None,
                   metavar="DTYPE:on|off|POLICY",
                   help="train (dtype, remat) pairs, e.g. float32:off bfloat16:on bfloat16:dots "
                        "(a POLICY of model.remat_policy: remat on with it) "
                        "(default: every --dtypes with remat off and on)")
    p.add_argument("--train-at-memory-targets", action="store_true",
                   help="time the memory check's steps (batch 16, and 64 with remat) and report "
                        "them as the train section instead of a separate batch search: one "
                        "compile per step, for a short device lease")
    p.add_argument("--no-infer", action="store_true")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--memory-dtypes", nargs="+", choices=DTYPES, default=None,
                   help="dtypes of the train-memory check (default: --dtypes)")
    p.add_argument("--memory-targets", nargs="+", type=memory_target, default=None,
                   metavar="BATCH:on|off|POLICY",
                   help="(batch, remat) rows of the train-memory check (default 16:off 64:on, "
                        "the issue's targets; e.g. 64:dots_all = remat with that policy)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the train-memory check (batch 16, and 64 with remat)")
    p.add_argument("--no-torch", action="store_true", help="skip the CPU PyTorch comparison")
    p.add_argument("--threads", type=int, default=None, help="pin to this many CPUs")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--md", default=None,
                   help="RESULTS.md path (default benchmarks/RESULTS.md; not written by --quick "
                        "unless given)")
    p.add_argument("--md-only", action="store_true", help="regenerate RESULTS.md and exit")
    a = p.parse_args(argv)
    out_dir = a.out or common.RESULTS_DIR
    if a.md_only:
        print("wrote", write_markdown(out_dir, a.md or RESULTS_MD))
        return
    if a.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"  # before jax is imported
    # JAX preallocates 75% of GPU memory by default; the memory figures need (nearly) all of it.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.threads:
        common.pin_cpus(a.threads)
    try:
        run(a)
    except common.CompiledOnly:  # $VIPA_BENCH_COMPILE_ONLY: the first program is cached
        return
    if a.md or not a.quick:
        print("wrote", write_markdown(out_dir, a.md or RESULTS_MD))


if __name__ == "__main__":
    main()
