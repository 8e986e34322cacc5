"""Swin window attention forms side by side: an A/B of the `swin.attention_*` switches (issue 8).

``python -m benchmarks.attention [--device gpu] [--batch 8] [--dtype bfloat16] [--train]
[--impls einsum cudnn] [--variant NAME:KEY=VALUE[,...]]`` writes
``benchmarks/results/attention-<machine>-<train|infer>-<dtype>.json``; ``--quick`` = a tiny Swin
at 64 px, 2 iterations (the smoke test).

Swin-B w12 at 480×480 (its 24 blocks are where VIPA's attention FLOPs are) with the same random
weights, compiled once per variant. A variant is a name and Swin keyword overrides:
- `einsum`: `layers.dot_product_attention`'s two batched matmuls with a float32 softmax (its
  division after the value product), the q/k/v projection as `auto` picks for the backend
  (`qkv_projection`: separate on a CPU, one fused GEMM elsewhere);
- `separate` / `fused`: einsum with the q/k/v projection of the other backend, so both are
  timed; `normalized`: einsum with the textbook softmax (`attention_softmax`);
- `xla`: `jax.nn.dot_product_attention`'s XLA implementation;
- `cudnn`: `jax.nn.dot_product_attention(implementation='cudnn')`, cuDNN's fused (flash)
  attention; GPU only, float16 / bfloat16 compute;
- ``--variant NAME:KEY=VALUE,...`` adds any other, e.g. ``fused:qkv_projection=fused``.
``--impls`` picks among the named ones (einsum, separate, fused, normalized, xla, cudnn).
Timed in alternating blocks (`common.time_calls`): the forward, and with `--train` the forward
+ backward (gradient of a scalar of the four stage outputs with respect to the parameters).
A variant that fails to compile (e.g. cuDNN rejecting a shape) is recorded with its error
instead of stopping the run. `max_rel_diff`: the largest difference from the first variant's
outputs (the four stage features, or the gradients with `--train`), relative to their largest
entry (a per-array scale would divide by the key biases' gradients, which are zero up to
rounding: softmax ignores a shift shared by all keys); `speedup`: over the first variant.
Default variants: einsum, the other backend's projection, xla and, on a GPU, cudnn; dtype:
bfloat16 on a GPU, float32 on a CPU.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from benchmarks import common

QUICK_SWIN = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), window_size=4)


def _compile(model: Any, params: Any, images: Any, train: bool) -> tuple[Any, dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    if not train:
        return common.compile_jax(model.apply, params, images)

    def loss(p: Any, x: Any) -> Any:
        return sum(jnp.mean(f.astype(jnp.float32) ** 2) for f in model.apply(p, x))

    return common.compile_jax(jax.grad(loss), params, images)


NAMED_VARIANTS: dict[str, dict[str, str]] = {
    "einsum": {}, "separate": {"qkv_projection": "separate"},
    "fused": {"qkv_projection": "fused"}, "normalized": {"attention_softmax": "normalized"},
    "xla": {"attention_impl": "xla"}, "cudnn": {"attention_impl": "cudnn"},
}


def default_variants(gpu: bool) -> list[str]:
    """einsum, einsum with the other backend's q/k/v projection, xla and (GPU) cudnn."""
    return ["einsum", "separate", "xla", "cudnn"] if gpu else ["einsum", "fused", "xla"]


def run(
    quick: bool = False, batch: int | None = None, dtype: str | None = None,
    impls: list[str] | None = None, iters: int | None = None, train: bool = False,
    image_size: int = 480, out_dir: str | None = None, write: bool = True,
    variants: list[tuple[str, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Time the named variants `impls` (default `default_variants`) and then `variants`."""
    import jax
    import jax.numpy as jnp

    from vipa_jax.models.swin import SWIN_CONFIGS, SwinTransformer

    gpu = jax.default_backend() == "gpu"
    dtype = dtype or ("bfloat16" if gpu else "float32")
    if impls is None and not variants:
        impls = default_variants(gpu)
    unknown = sorted(set(impls or ()) - set(NAMED_VARIANTS))
    if unknown:
        raise ValueError(f"unknown attention variants {unknown}; named: {sorted(NAMED_VARIANTS)}")
    todo = [(name, NAMED_VARIANTS[name]) for name in impls or ()] + list(variants or ())
    cfg = dict(QUICK_SWIN) if quick else dict(SWIN_CONFIGS["base"])
    size = 64 if quick else image_size
    batch = batch or (1 if quick or not gpu else 8)
    iters = iters or (2 if quick else 20 if gpu else 5)
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.standard_normal((batch, size, size, 3), np.float32))
    base = SwinTransformer(**cfg, dtype=jnp.dtype(dtype))
    params = jax.jit(base.init)(jax.random.PRNGKey(0), images[:1])
    print(f"Swin {'quick' if quick else 'base w12'} @ {size}, batch {batch}, {dtype}, "
          f"{'forward + backward' if train else 'forward'} on {jax.devices()[0].device_kind}; "
          f"{iters} timed runs", flush=True)

    entries: dict[str, dict[str, Any]] = {}
    fns = {}
    for name, overrides in todo:
        entries[name] = {"overrides": dict(overrides)}
        try:
            model = SwinTransformer(**{**cfg, **overrides}, dtype=jnp.dtype(dtype))
            compiled, info = _compile(model, params, images, train)
        except common.CompiledOnly:  # $VIPA_BENCH_COMPILE_ONLY: cached, go on to the next
            entries[name]["compiled_only"] = True
            continue
        except Exception as e:  # noqa: BLE001 - record why (cuDNN's shape limits) and go on
            entries[name]["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"  {name:9s} failed to compile: {entries[name]['error'][:200]}", flush=True)
            continue
        entries[name].update(compile_s=info["compile_s"], hlo_flops=info["hlo_flops"])
        fns[name] = lambda c=compiled: c(params, images)
    if os.environ.get(common.COMPILE_ONLY_ENV):
        return {"compile_only": True, "variants": entries}
    timings = common.time_calls(fns, iters=iters, warmup=1) if fns else {}

    def leaves(out: Any) -> list[np.ndarray]:
        return [np.asarray(x, np.float32) for x in jax.tree.leaves(out)]

    first = next(iter(timings), None)
    ref = leaves(fns[first]()) if first else None
    for name, t in timings.items():
        e = entries[name]
        e.update(median_ms=t["median_s"] * 1e3, p90_ms=t["p90_s"] * 1e3, n=t["n"])
        e["speedup"] = timings[first]["median_s"] / t["median_s"]
        # features (inference) or gradients (train)
        diff = max(float(np.abs(a - b).max())
                   for a, b in zip(leaves(fns[name]()), ref, strict=True))
        e["max_rel_diff"] = diff / (max(float(np.abs(b).max()) for b in ref) or 1.0)
    rows = [[name, e.get("compile_s"), e.get("median_ms"), e.get("p90_ms"),
             e.get("speedup"), e.get("max_rel_diff"), e.get("error", "")[:60]]
            for name, e in entries.items()]
    common.print_table(rows, ["variant", "compile s", "median ms", "p90 ms",
                              f"x {first or 'first'}", "max rel diff", "error"])
    result: dict[str, Any] = {
        "quick": quick, "swin": cfg, "image_size": size, "batch": batch, "dtype": dtype,
        "mode": "train" if train else "inference", "iters": iters,
        "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
        "reference": first, "variants": entries,
    }
    if write:
        tag = f"{'train' if train else 'infer'}-{dtype}"
        result["path"] = common.write_result("attention", result, out_dir, tag=tag)
        print("wrote", result["path"])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--quick", action="store_true", help="tiny Swin at 64 px, 2 iterations")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--impls", nargs="+", choices=tuple(NAMED_VARIANTS), default=None,
                   help="named variants (default: einsum, the other backend's forms, xla, "
                        "cudnn on a GPU)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,...]",
                   help="a variant of Swin keyword overrides, e.g. fused:qkv_projection=fused")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--image-size", type=int, default=480)
    p.add_argument("--train", action="store_true", help="time forward + backward")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    a = p.parse_args()
    common.use_device(a.device)
    variants = [common.parse_variant(v) for v in a.variant]
    run(quick=a.quick, batch=a.batch, dtype=a.dtype, iters=a.iters, train=a.train,
        impls=a.impls if a.impls or not variants else [], variants=variants,
        image_size=a.image_size, out_dir=a.out)


if __name__ == "__main__":
    main()
