"""bfloat16 products on this backend: GEMMs and 3×3 convolutions by result type and form (issue 8).

``python -m benchmarks.lowp_gemm [--device cpu|gpu] [--iters N] [--quick] [--out DIR]`` prints one
table and writes ``benchmarks/results/lowp_gemm-<machine>-<isa or device>.json``; ``--quick``
= small shapes, 2 iterations (the smoke test).

At the paper model's shapes, each timed in alternating blocks (`common.time_calls`) with the
same random operands:
- GEMMs ((M, K)·(K, N): a square one, Swin stage 1's MLP, BERT's at 21 tokens, the decoder's
  stage-4 MLP): float32; bfloat16 with bfloat16 results (`dot_results=native`: XLA:CPU converts
  both operands to float32 and multiplies in float32); bfloat16 asking for float32 results and
  rounding them back (`dot_results=float32`, `layers.dot_general`: XLA:CPU runs it in its GEMM
  library, on AMX or AVX512-BF16 where the CPU has them).
- The decoder's 3×3 convolutions (one image; 120, 60 and 30 px maps): XLA's convolution in
  float32 and in bfloat16, and `decoder.conv3x3_taps` in bfloat16 (nine GEMMs with float32
  results, what `decoder.conv_impl='auto'` picks for bfloat16 on a CPU).
`err`: the largest difference from the float32 form, relative to its largest entry.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from benchmarks import common

GEMMS = {"square": (3600, 1024, 1024), "swin_s1_mlp": (14400, 128, 512),
         "bert_21tok": (21, 768, 3072), "decoder_s4_mlp": (225, 1024, 4096)}
CONVS = {"up1_0 (120px 640->512)": (120, 640, 512), "up1_1 (120px 512->512)": (120, 512, 512),
         "up2_0 (60px 768->512)": (60, 768, 512), "up3_0 (30px 1536->512)": (30, 1536, 512)}
QUICK_GEMMS = {"square": (64, 48, 40), "bert_like": (5, 48, 96)}
QUICK_CONVS = {"small": (12, 16, 8)}


def _forms(kind: str) -> dict[str, Any]:
    """name -> (operand dtype, fn(a, b)) of the forms timed for `kind` ('gemm' | 'conv')."""
    import jax
    import jax.numpy as jnp

    from vipa_jax.models.decoder import conv3x3_taps
    from vipa_jax.models.layers import dot_results, matmul

    def under(mode: str, fn: Any) -> Any:
        def call(a: Any, b: Any) -> Any:
            with dot_results(mode):
                return fn(a, b)
        return call

    if kind == "gemm":
        return {"float32": (jnp.float32, under("native", matmul)),
                "bf16 native": (jnp.bfloat16, under("native", matmul)),
                "bf16 float32 results": (jnp.bfloat16, under("float32", matmul))}

    def xla_conv(x: Any, k: Any) -> Any:
        return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    return {"float32 xla": (jnp.float32, xla_conv),
            "bf16 xla": (jnp.bfloat16, xla_conv),
            "bf16 taps": (jnp.bfloat16, under("float32", conv3x3_taps))}


def _section(kind: str, shapes: dict[str, tuple[int, ...]], iters: int) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    rows = []
    for label, shape in shapes.items():
        if kind == "gemm":
            m, k, n = shape
            a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n)) / np.sqrt(k)
            flops = 2 * m * k * n
        else:
            side, cin, cout = shape
            a = rng.standard_normal((1, side, side, cin))
            b = rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)
            flops = 2 * side * side * 9 * cin * cout
        compiled, args = {}, {}
        for name, (dtype, fn) in _forms(kind).items():
            ops = (jnp.asarray(a, dtype), jnp.asarray(b, dtype))
            compiled[name] = jax.jit(fn).lower(*ops).compile()
            args[name] = ops
        times = common.time_calls({n: (lambda c=c, o=args[n]: c(*o)) for n, c in compiled.items()},
                                  iters=iters, warmup=1)
        outs = {n: np.asarray(c(*args[n]), np.float32) for n, c in compiled.items()}
        ref = next(iter(outs.values()))  # the float32 form's
        for name, t in times.items():
            out = outs[name]
            rows.append({
                "kind": kind, "shape": label, "dims": list(shape), "form": name,
                "median_ms": t["median_s"] * 1e3, "p90_ms": t["p90_s"] * 1e3, "n": t["n"],
                "gflops_per_s": flops / t["median_s"] / 1e9,
                "max_rel_err": float(np.abs(out - ref).max() / (np.abs(ref).max() or 1.0)),
            })
    return rows


def run(quick: bool = False, iters: int | None = None, out_dir: str | None = None,
        write: bool = True) -> dict[str, Any]:
    """Time every form -> the result dict (also written to benchmarks/results/ with `write`)."""
    import jax

    iters = iters or (2 if quick else 10)
    rows = (_section("gemm", QUICK_GEMMS if quick else GEMMS, iters)
            + _section("conv", QUICK_CONVS if quick else CONVS, iters))
    common.print_table(
        [[r["kind"], r["shape"], r["form"], r["median_ms"], r["p90_ms"], r["gflops_per_s"],
          r["max_rel_err"]] for r in rows],
        ["kind", "shape", "form", "median ms", "p90 ms", "GFLOP/s", "err"],
        title=f"bfloat16 products on {jax.default_backend()} ({jax.devices()[0].device_kind})")
    result: dict[str, Any] = {"quick": quick, "iters": iters, "backend": jax.default_backend(),
                              "device_kind": jax.devices()[0].device_kind, "rows": rows}
    if write:
        tag = common.device_tag(result["backend"], result["device_kind"]) + (
            "-quick" if quick else "")
        result["path"] = common.write_result("lowp_gemm", result, out_dir, tag=tag)
        print("wrote", result["path"])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--quick", action="store_true", help="small shapes, 2 iterations")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    a = p.parse_args()
    common.use_device(a.device)
    run(quick=a.quick, iters=a.iters, out_dir=a.out)


if __name__ == "__main__":
    main()
