"""Backbone forward speed: our Flax Swin / BERT (jitted) vs the same PyTorch models (eager).

``python -m benchmarks.backbones [--iters 5] [--swin base] [--image-size 480] [--tokens 21]``
writes ``benchmarks/results/backbones-<machine>.json``; ``--quick`` = tiny models, 2 iterations
(the smoke test).

Both sides run the *same weights* on the *same input*: batch 1, float32, CPU.
- Swin: `transformers.SwinBackbone` (out_features stage1..4 = `SwinModel`'s encoder + the
  four per-stage LayerNorms, i.e. exactly our `SwinTransformer` outputs) with random weights,
  converted into ours by `vipa_jax.weights.swin.load_swin_params`.
- BERT: `transformers.BertModel(add_pooling_layer=False)` random init, converted by
  `vipa_jax.weights.bert.convert_torch_state_dict` / `match_target`.
JAX: `jax.jit(model.apply)` compiled ahead of time (compile time reported separately), on the
variables inference uses (`vipa.with_inference_cache`: on a CPU the kernels of the layers with
few input rows also stored transposed, as PyTorch's Linear stores them); PyTorch:
eager under `torch.inference_mode()`, `torch.set_num_threads(cpu_count)`; XLA's CPU backend
uses one thread per core by default. Runs alternate in blocks (jax x k, torch x k, jax x k,
torch x k; see `common.time_calls`) so background load affects both; the figure of merit
is ratio = our median / PyTorch median (target ≤ 0.8). FLOPs: XLA cost analysis of the
compiled function (2 per multiply-add, plus elementwise ops) and the multiply-accumulate count
of its matmuls/convs from the jaxpr.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from benchmarks import common

QUICK_SWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4)
QUICK_BERT = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64)
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512)


def _swin_config(name: str) -> dict[str, Any]:
    from vipa_jax.models.swin import SWIN_CONFIGS

    if name == "quick":
        return dict(QUICK_SWIN)
    if name not in SWIN_CONFIGS:
        raise SystemExit(f"--swin must be one of {sorted(SWIN_CONFIGS)} or 'quick', got {name!r}")
    return dict(SWIN_CONFIGS[name])


def _randomize_(model: Any, seed: int) -> None:
    """Re-draw every parameter (O(1) relative-position tables, so the parity check means more)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("relative_position_bias_table"):
                p.copy_(noise)
            elif p.ndim == 1 and "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.02 * noise)
            else:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))


def build_swin(cfg: dict[str, Any], seed: int = 0) -> tuple[Any, Any, Any]:
    """-> (HF SwinBackbone in eval mode, our SwinTransformer, our params with the same weights)."""
    import torch
    import transformers

    from vipa_jax.models.swin import SwinTransformer
    from vipa_jax.weights.swin import load_swin_params

    config = transformers.SwinConfig(
        embed_dim=cfg["embed_dim"], depths=list(cfg["depths"]), num_heads=list(cfg["num_heads"]),
        window_size=cfg["window_size"], image_size=224, drop_path_rate=0.0,
        out_features=[f"stage{i + 1}" for i in range(len(cfg["depths"]))],
    )
    torch.manual_seed(seed)
    hf = transformers.SwinBackbone(config).eval()
    _randomize_(hf, seed)
    ours = SwinTransformer.from_config(cfg)
    params, report = load_swin_params(hf.state_dict(), ours)
    if report.missing:
        raise RuntimeError(f"Swin conversion left params at init: {report.missing}")
    return hf, ours, params


def build_bert(cfg: dict[str, Any], seed: int = 0) -> tuple[Any, Any, Any]:
    """-> (HF BertModel in eval mode, our BertModel, our params with the same weights)."""
    import jax
    import torch
    import transformers

    from vipa_jax.models.bert import BertConfig, BertModel
    from vipa_jax.weights.bert import convert_torch_state_dict, match_target

    hf_cfg = transformers.BertConfig(**cfg, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    hf = transformers.BertModel(hf_cfg, add_pooling_layer=False).eval()
    _randomize_(hf, seed)
    ours = BertModel(BertConfig.from_dict(cfg), add_pooling_layer=False)
    ids = jax.ShapeDtypeStruct((1, 8), np.int32)
    target = jax.eval_shape(ours.init, jax.random.key(0), ids)["params"]
    params, report = match_target(convert_torch_state_dict(hf.state_dict()), target,
                                  source="random HF BertModel", strict=True)
    if report.missing:
        raise RuntimeError(f"BERT conversion missed {report.missing}")
    return hf, ours, params


def _bench_pair(
    name: str, jax_fn: Any, jax_args: tuple, torch_fn: Any, iters: int, warmup: int,
) -> dict[str, Any]:
    """Compile + time one JAX function against its PyTorch twin; outputs compared.

    `jax_args` go to the device first: the converted weights are NumPy arrays, and a jitted call
    copies every NumPy argument to the device anew (BERT-base: 340 MB, 55 instead of 34 ms per
    call on the 2-core Zen 4 VM), while PyTorch uses its weights in place.
    """
    import jax
    import torch

    jax_args = jax.device_put(jax_args)
    compiled, cost = common.compile_jax(jax_fn, *jax_args)
    macs = common.count_macs(jax_fn, *jax_args)
    ours_out = jax.block_until_ready(compiled(*jax_args))
    with torch.inference_mode():
        ref_out = torch_fn()
    diff = max(float(np.max(np.abs(np.asarray(a) - b)))
               for a, b in zip(ours_out, ref_out, strict=True))
    load_before = common.load_snapshot()
    with torch.inference_mode():
        timings = common.time_calls({"jax": lambda: compiled(*jax_args), "torch": torch_fn},
                                    iters=iters, warmup=warmup)
    return {
        "name": name,
        "jax": {**timings["jax"], "lower_s": cost["lower_s"], "compile_s": cost["compile_s"]},
        "torch": timings["torch"],
        "ratio_ours_over_torch": timings["jax"]["median_s"] / timings["torch"]["median_s"],
        "ratio_of_min_times": timings["jax"]["min_s"] / timings["torch"]["min_s"],
        "xla_flops": cost["flops"],
        "xla_transcendentals": cost.get("transcendentals", 0.0),
        "macs": macs,
        "max_abs_diff": diff,
        "load_before": load_before,
        "load_after": common.load_snapshot(),
    }


def run(
    swin: str = "base", image_size: int = 480, tokens: int = 21, iters: int = 5,
    bert_iters: int | None = None, warmup: int = 1, quick: bool = False,
    out_dir: str | None = None, write: bool = True,
) -> dict[str, Any]:
    """Runs both comparisons; returns (and writes) the result dict."""
    import jax
    import torch

    from vipa_jax.models.vipa import with_inference_cache

    if quick:
        swin, image_size, tokens, iters = "quick", 64, 8, 2
    bert_iters = bert_iters or (iters if quick else 10 * iters)
    threads = common.cpu_count()
    torch.set_num_threads(threads)
    swin_cfg = _swin_config(swin)
    bert_cfg = dict(QUICK_BERT if quick else BERT_BASE)
    rng = np.random.default_rng(0)

    results = []
    hf, ours, params = build_swin(swin_cfg)
    images = rng.standard_normal((1, image_size, image_size, 3), np.float32)
    images_t = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

    def swin_torch() -> list[np.ndarray]:
        return [f.numpy().transpose(0, 2, 3, 1) for f in hf(images_t).feature_maps]

    variables = with_inference_cache(ours, {"params": params}, images)
    results.append(_bench_pair(
        f"swin-{swin}@{image_size}", lambda v, x: ours.apply(v, x),
        (variables, jax.device_put(images)), swin_torch, iters, warmup))
    del hf, params

    hf, ours, params = build_bert(bert_cfg)
    vocab = bert_cfg["vocab_size"]
    ids = rng.integers(min(1999, vocab // 2), vocab, (1, tokens)).astype(np.int32)
    mask = np.ones((1, tokens), np.int32)
    mask[:, max(2, tokens - 5):] = 0  # some padding, as in real batches
    ids_t, mask_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    def bert_torch() -> list[np.ndarray]:
        return [hf(ids_t, attention_mask=mask_t).last_hidden_state.numpy()]

    variables = with_inference_cache(ours, {"params": params}, ids, mask)
    results.append(_bench_pair(
        f"bert-{'quick' if quick else 'base'}@{tokens}tok",
        lambda v, i, m: [ours.apply(v, i, m).last_hidden_state],
        (variables, jax.device_put(ids), jax.device_put(mask)), bert_torch, bert_iters, warmup))

    result = {
        "quick": quick, "batch": 1, "dtype": "float32", "image_size": image_size,
        "tokens": tokens, "swin_config": swin_cfg, "bert_config": bert_cfg,
        "torch_threads": threads, "iters": {"swin": iters, "bert": bert_iters},
        "target_ratio": 0.8, "results": results,
    }
    _print(result)
    if write:
        result["path"] = common.write_result("backbones", result, out_dir)
        print("wrote", result["path"])
    return result


def _print(result: dict[str, Any]) -> None:
    rows = []
    for r in result["results"]:
        rows.append([
            r["name"], r["jax"]["compile_s"], r["jax"]["median_s"] * 1e3, r["jax"]["p90_s"] * 1e3,
            r["torch"]["median_s"] * 1e3, r["torch"]["p90_s"] * 1e3, r["ratio_ours_over_torch"],
            r["ratio_of_min_times"],
            r["xla_flops"] / 1e9, r["macs"] / 1e9, f"{r['max_abs_diff']:.1e}",
        ])
    common.print_table(rows, [
        "model", "compile s", "jax med ms", "jax p90 ms", "torch med ms", "torch p90 ms",
        "ours/torch", "min/min", "XLA GFLOPs", "GMACs", "max|diff|"],
        title=f"batch 1, float32, CPU x{result['torch_threads']} threads "
              f"(target ours/torch <= {result['target_ratio']}); load: "
              f"{result['results'][0]['load_before']}")
    print("ours/torch = ratio of medians; min/min = ratio of fastest runs (less load-sensitive).")
    print("XLA GFLOPs = cost_analysis()['flops'] (multiply-add = 2, elementwise ops included); "
          "GMACs = matmul/conv multiply-accumulates (fvcore's 'FLOPs').")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--swin", default="base", help="Swin preset (tiny|small|base|large)")
    p.add_argument("--image-size", type=int, default=480)
    p.add_argument("--tokens", type=int, default=21)
    p.add_argument("--iters", type=int, default=5, help="timed Swin runs (BERT: 10x)")
    p.add_argument("--bert-iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny models, 2 iterations")
    p.add_argument("--threads", type=int, default=None,
                   help="pin the process to this many CPUs (both frameworks; default: all)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.threads:  # before jax/torch size their thread pools (both read the CPU affinity)
        common.pin_cpus(a.threads)
    run(a.swin, a.image_size, a.tokens, a.iters, a.bert_iters, a.warmup, a.quick, a.out)


if __name__ == "__main__":
    main()
