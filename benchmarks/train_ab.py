"""The full train step under config variants side by side: an A/B of any switch (issue 8).

``python -m benchmarks.train_ab [--device gpu] [--dtype bfloat16] [--batch 16] [--remat]
--variant NAME:KEY=VALUE[,KEY=VALUE...] [--variant ...] [--no-base]`` writes
``benchmarks/results/train_ab-<machine>-<device>-<dtype>-b<batch>[-remat].json``; ``--quick`` =
the tiny synthetic:test model, 2 iterations (the smoke test).

Each variant is the `refcoco` config (or ``--config synthetic``) at ``--dtype`` / ``--remat``
with its overrides, e.g. ``cond:train.finite_guard=cond`` or
``cudnn:model.swin.attention_impl=cudnn``; ``base`` (no overrides) comes first unless
``--no-base``. Every variant gets the same random parameters and batch
(`benchmarks.input_pipeline.compile_train_step`: the program `benchmarks.run` times, the state
donated and each call fed the state the last one returned; the decoder convolution as on a GPU,
`run._as_on_gpu`), is compiled once (a compile error is recorded, not fatal) and the variants
are timed in alternating blocks (`common.time_calls`, ``--rounds`` blocks each). Reported per
variant: compile time (a persistent-cache load says so), step median / p90, images/s, the
speedup over ``base``, FLOP utilization (the step's own HLO FLOP count over the device's peak for
the dtype, `run.peak_flops`: MFU without remat, HFU with it; GPU only), with remat also the MFU
(`mfu`: the FLOPs of the same step traced without remat, `input_pipeline.train_step_flops`)
and the loss of the first step (the same state and batch for all: a variant that changes the
math shows here).
With ``$VIPA_BENCH_COMPILE_ONLY`` set, every variant is compiled into JAX's persistent
compilation cache and nothing runs (`device_suite.sh`'s `precompile`).
"""

from __future__ import annotations

import argparse
import copy
import os
from typing import Any

from benchmarks import common
from benchmarks.common import parse_variant  # noqa: F401 - the CLI's and tests' parser


def cli_variants(no_base: bool, specs: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """``base`` (unless `no_base`) and each ``--variant`` spec, parsed; ValueError if none."""
    variants = ([] if no_base else [("base", {})]) + [parse_variant(v) for v in specs]
    if not variants:
        raise ValueError("nothing to run: --no-base and no --variant")
    return variants


def variant_configs(variants: list[tuple[str, dict[str, Any]]], config: str, quick: bool,
                    dtype: str, remat: bool) -> dict[str, Any]:
    """{name: the full config at `dtype` / `remat` with the variant's overrides, the decoder
    convolution as on a GPU}; every override checked before anything compiles."""
    from benchmarks.run import _as_on_gpu, _with, load_config

    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must differ: {names}")
    base_cfg = _with(load_config(config, quick), dtype=dtype, remat=remat)
    return {n: _as_on_gpu(apply_overrides(base_cfg, o)) for n, o in variants}


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """A copy of `cfg` with dotted `key: value` overrides; an unknown key is an error."""
    out = copy.deepcopy(cfg)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = out
        for i, part in enumerate(parents):
            if part not in node:
                raise KeyError(f"config has no {'.'.join(parents[:i + 1])!r} (from {key!r})")
            node = node[part]
        if leaf not in node:
            raise KeyError(f"config has no {key!r}")
        node[leaf] = value
    return out


def run(
    variants: list[tuple[str, dict[str, Any]]], *, config: str = "refcoco", quick: bool = False,
    dtype: str | None = None, batch: int | None = None, remat: bool = False,
    iters: int | None = None, rounds: int | None = None, out_dir: str | None = None,
    write: bool = True,
) -> dict[str, Any]:
    import jax
    import numpy as np

    from benchmarks.input_pipeline import compile_train_step, train_step_flops
    from benchmarks.run import load_config, peak_flops

    gpu = jax.default_backend() == "gpu"
    device_kind = jax.devices()[0].device_kind
    dtype = dtype or ("bfloat16" if gpu else "float32")
    batch = batch or (16 if gpu and not quick else 2)
    iters = iters or (2 if quick else 20 if gpu else 5)
    rounds = rounds or (2 if quick else 4)
    cfgs = variant_configs(variants, config, quick, dtype, remat)  # errors first
    names = list(cfgs)
    compile_only = bool(os.environ.get(common.COMPILE_ONLY_ENV))
    print(f"train step A/B: {'synthetic:test' if quick else config}, batch {batch}, {dtype}, "
          f"remat {remat}, on {device_kind}; variants {names}; "
          + ("compile only" if compile_only else f"{iters} timed runs in {rounds} blocks"),
          flush=True)

    entries: dict[str, dict[str, Any]] = {}
    fns = {}
    for name, overrides in variants:
        e: dict[str, Any] = {"overrides": overrides}
        entries[name] = e
        try:
            call, compiled, info = compile_train_step(cfgs[name], batch)
        except common.CompiledOnly as done:
            e.update(compiled_only=True, compile_s=done.args[0]["compile_s"])
            continue
        except Exception as err:  # noqa: BLE001 - record why (a backend's limits) and go on
            e["error"] = f"{type(err).__name__}: {str(err)[:500]}"
            print(f"  {name}: failed to compile: {e['error'][:200]}", flush=True)
            continue
        e.update(compile_s=info["lower_s"] + info["compile_s"], compile_cache_hit=info["cache_hit"],
                 program_compile_s=info.get("program_compile_s"),
                 hlo_flops_per_step=info["hlo_flops"], hlo_flops_source=info["hlo_flops_source"],
                 xla_memory=common.memory_of(compiled))
        e["first_loss"] = float(np.asarray(call()["loss"]))  # the same state for all
        fns[name] = call
    timings = common.time_calls(fns, iters=iters, warmup=1, rounds=rounds) if fns else {}
    base = timings.get(names[0]) if names else None
    peak, peak_source = peak_flops(device_kind, dtype) if gpu else (None, "n/a on CPU")
    for name, t in timings.items():
        e = entries[name]
        e.update(step_median_ms=t["median_s"] * 1e3, step_p90_ms=t["p90_s"] * 1e3,
                 step_min_ms=t["min_s"] * 1e3, n=t["n"], images_per_s=batch / t["median_s"],
                 achieved_tflops=e["hlo_flops_per_step"] / t["median_s"] / 1e12)
        e["flop_utilization"] = e["achieved_tflops"] * 1e12 / peak if peak else None
        if remat:  # MFU counts the model's FLOPs: the same step traced without remat
            e["model_flops_per_step"] = train_step_flops(cfgs[name], batch)
            e["mfu"] = e["model_flops_per_step"] / t["median_s"] / peak if peak else None
        if base is not None:
            e["speedup_vs_first"] = base["median_s"] / t["median_s"]
        if "first_loss" in entries[names[0]]:
            e["first_loss_diff_vs_first"] = e["first_loss"] - entries[names[0]]["first_loss"]
    def percent(value: float | None) -> float | None:
        return None if value is None else 100 * value

    rows = [[n, ",".join(f"{k}={v}" for k, v in e["overrides"].items()) or "-",
             e.get("compile_s"), e.get("step_median_ms"), e.get("step_p90_ms"),
             e.get("images_per_s"), e.get("speedup_vs_first"),
             percent(e.get("flop_utilization")), percent(e.get("mfu")), e.get("first_loss"),
             e.get("error", "compiled only" if e.get("compiled_only") else "")[:60]]
            for n, e in entries.items()]
    common.print_table(rows, ["variant", "overrides", "compile s", "median ms", "p90 ms",
                              "img/s", f"x {names[0]}", "util %", "MFU %", "first loss",
                              "note"])
    result: dict[str, Any] = {
        "quick": quick, "config": "synthetic:test" if quick else config, "batch": batch,
        "dtype": dtype, "remat": remat, "iters": iters, "rounds": rounds,
        "image_size": load_config(config, quick).model.image_size,
        "backend": jax.default_backend(),
        "device_kind": device_kind, "peak_flops": peak, "peak_flops_source": peak_source,
        "compile_only": compile_only, "variants": entries,
        "load": common.load_snapshot(),
    }
    if write and not compile_only:
        where = ("cpu-" if not gpu else "") + common.device_tag(result["backend"], device_kind)
        if config != "refcoco" and not quick:
            where += f"-{config}"
        tag = f"{where}-{dtype}-b{batch}{'-remat' if remat else ''}"
        result["path"] = common.write_result("train_ab", result, out_dir, tag=tag)
        print("wrote", result["path"])
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--config", choices=("refcoco", "synthetic"), default="refcoco")
    p.add_argument("--quick", action="store_true", help="tiny synthetic:test model, 2 iterations")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--batch", type=int, default=None, help="default 16 on a GPU, else 2")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,...]",
                   help="a variant's config overrides (repeatable), e.g. "
                        "cond:train.finite_guard=cond or d6:model.swin.depths=(2,2,6,2) "
                        "(values are Python literals where they parse as one)")
    p.add_argument("--no-base", action="store_true",
                   help="leave out the 'base' variant (the config with no overrides)")
    p.add_argument("--iters", type=int, default=None,
                   help="timed steps per variant (default 20 on a GPU, 5 on a CPU, 2 quick)")
    p.add_argument("--rounds", type=int, default=None,
                   help="alternating blocks the timed steps are split into (default 4)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    a = p.parse_args(argv)
    try:
        variants = cli_variants(a.no_base, a.variant)
    except ValueError as err:
        p.error(str(err))
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    common.use_device(a.device)
    return run(variants, config=a.config, quick=a.quick, dtype=a.dtype, batch=a.batch,
               remat=a.remat, iters=a.iters, rounds=a.rounds, out_dir=a.out)


if __name__ == "__main__":
    main()
