"""VIPA compute: GFLOPs (both conventions) and parameters per part, and full-model CPU speed.

``python -m benchmarks.model [--quick] [--iters 3] [--no-time] [--no-torch]`` writes
``benchmarks/results/model-<machine>.json``. Default: the paper config (`configs/refcoco.py`:
Swin-B w12 + BERT-base, 480×480, 21 tokens), batch 1, inference (`train=False`);
``--quick`` = `configs/synthetic.py:test` (tiny), 2 iterations, parts not compiled.

Two FLOP conventions, printed side by side:
- XLA: `jax.jit(f).lower(...).compile().cost_analysis()['flops']` — one multiply-add = 2 flops,
  elementwise ops (softmax, norms, GELU, residual adds) count as well, and convolution taps
  that fall on zero padding are not counted.
- MACs: multiply-accumulates of every matmul/einsum (`dot_general`) and convolution, counted
  from the jaxpr (`common.count_macs`). This is what fvcore / ptflops / thop — and so most
  segmentation papers, Swin's "15.4G" for Swin-B@224 included — call "FLOPs".

Breakdown method: each part is lowered on its own with the full model's parameters, via
`model.apply(variables, ..., method=<fn of the bound module>)` on abstract inputs of the shapes
the full forward feeds it:
- swin     = `encoder.backbone(images)` (Swin-B with its 4 stage norms; no fusion);
- bert     = `encoder.text_encoder` (embeddings + layers 0..5) + the new BERT layers of
             language stages 2–4 (`encoder.lang_layers_*`), on the tokens alone;
- fusion   = encoder − swin − bert: the 7 gated vision←language fusions and the 3
             language←vision cross-attention layers (`fuse_*`, `fuse_down_*`, `lang_cross_*`);
- advanced_lang, veg = Ê_L and the Visual Expressive Generator (steps 1 and 2);
- decoder  = the 4 stage cross-attentions, 3×3 conv upsampling path, head, and the final
             bilinear upsampling to the input size;
- residual = total − (encoder + advanced_lang + veg + decoder) (glue; ≈ 0).
Parameters are summed from the param tree by the same grouping.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import common

PAPER_GFLOPS = 431.0
PAPER_MS = 82.0  # FP32 inference, on the paper's GPU
PARTS = ("swin", "bert", "fusion", "advanced_lang", "veg", "decoder")
# The forward functions `part_functions` builds (`benchmarks.profile --part`).
FORWARD_PARTS = ("total", "encoder", "swin", "bert", "advanced_lang", "veg", "decoder")


def _config(quick: bool) -> Any:
    if quick:
        from configs.synthetic import get_config

        return get_config("test")
    from configs.refcoco import get_config

    return get_config()


def param_group(path: tuple[str, ...]) -> str:
    """Top-level param path -> part name."""
    top = path[0]
    if top == "encoder":
        sub = path[1]
        if sub == "backbone":
            return "swin"
        if sub == "text_encoder" or sub.startswith("lang_layers"):
            return "bert"
        return "fusion"  # fuse_i, fuse_down_i, lang_cross_i
    return top  # advanced_lang, veg, decoder


def count_params(params: Any) -> dict[str, int]:
    """Parameters per part (+ total and BERT's token-embedding table on its own)."""
    from flax.traverse_util import flatten_dict

    counts = {p: 0 for p in PARTS}
    embed = 0
    for path, leaf in flatten_dict(dict(params)).items():
        n = int(np.prod(leaf.shape))
        group = param_group(path)
        counts[group] = counts.get(group, 0) + n
        if "word_embeddings" in path:
            embed += n
    counts["total"] = sum(counts[p] for p in counts)
    counts["bert_word_embeddings"] = embed
    return counts


def random_variables(shapes: Any, seed: int = 0) -> Any:
    """Random values with the init's structure (fast: no jit of the full init)."""
    import jax
    from flax.traverse_util import flatten_dict, unflatten_dict

    rng = np.random.default_rng(seed)
    out = {}
    for path, s in flatten_dict(shapes).items():
        name = path[-1]
        if name in ("scale", "var"):
            v = np.ones(s.shape, s.dtype)
        elif name in ("log_tau", "relevance_bias", "mean"):
            v = np.zeros(s.shape, s.dtype)
        elif name == "relevance_scale":
            v = np.full(s.shape, 10.0, s.dtype)
        else:
            v = (0.02 * rng.standard_normal(s.shape)).astype(s.dtype)
        out[path] = v
    return jax.device_put(unflatten_dict(out))


def part_functions(model: Any, cfg: Any) -> dict[str, tuple[Callable[..., Any], str]]:
    """name -> (fn(variables, *inputs), which inputs) for the total and every part."""
    from vipa_jax.models.layers import resize_bilinear_align_corners as resize

    def enc(mod: Any, images: Any, ids: Any, mask: Any) -> Any:
        return tuple(mod.encoder(images, ids, mask, train=False))

    def swin(mod: Any, images: Any) -> Any:
        return mod.encoder.backbone(images)

    def bert(mod: Any, ids: Any, mask: Any) -> Any:
        te = mod.encoder.text_encoder
        lang = te.run_layers(te.embed(ids), mask, 0, cfg.lang_stage_layers[0])
        for stage in mod.encoder.lang_layers:
            for layer in stage:
                lang = layer(lang, mask, True)
        return lang

    def adv(mod: Any, lang: Any, vis: Any) -> Any:
        return mod.advanced_lang(lang, vis, train=False)

    def veg(mod: Any, vis: Any, lang_adv: Any, mask: Any) -> Any:
        return mod.veg(vis, lang_adv, mask, train=False)

    def dec(mod: Any, feats: Any, kv: Any, kv_mask: Any) -> Any:
        low = mod.decoder(list(feats), kv, kv_mask, train=False)
        return resize(low, (cfg.image_size, cfg.image_size))

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        return lambda v, *a: model.apply(v, *a, method=method)

    return {
        "total": (lambda v, im, ids, m: model.apply(v, im, ids, m, train=False), "full"),
        "encoder": (wrap(enc), "full"),
        "swin": (wrap(swin), "images"),
        "bert": (wrap(bert), "tokens"),
        "advanced_lang": (wrap(adv), "adv"),
        "veg": (wrap(veg), "veg"),
        "decoder": (wrap(dec), "decoder"),
    }


def abstract_inputs(model: Any, variables: Any, cfg: Any) -> dict[str, tuple[Any, ...]]:
    """Abstract (ShapeDtypeStruct) inputs of every part, from eval_shape of the pieces."""
    import jax
    import jax.numpy as jnp

    sds = jax.ShapeDtypeStruct
    images = sds((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    ids = sds((1, cfg.max_tokens), jnp.int32)
    mask = sds((1, cfg.max_tokens), jnp.int32)
    fns = part_functions(model, cfg)
    feats, lang = jax.eval_shape(fns["encoder"][0], variables, images, ids, mask)
    b, h, w, c = feats[-1].shape
    vis = sds((b, h * w, c), feats[-1].dtype)
    lang_adv = jax.eval_shape(fns["advanced_lang"][0], variables, lang, vis)
    veg_out = jax.eval_shape(fns["veg"][0], variables, vis, lang_adv, mask)
    kv, kv_mask = veg_out["tokens"], veg_out["token_mask"]
    return {
        "full": (images, ids, mask), "images": (images,), "tokens": (ids, mask),
        "adv": (lang, vis), "veg": (vis, lang_adv, mask), "decoder": (tuple(feats), kv, kv_mask),
    }


def random_model_variables(model: Any, cfg: Any) -> Any:
    """`random_variables` of a VIPA model's init shapes for model config `cfg` (no jitted init)."""
    import jax

    from vipa_jax.models.vipa import init_variables

    return random_variables(jax.eval_shape(
        lambda k: init_variables(model, k, cfg.image_size, cfg.max_tokens), jax.random.key(0)))


def part_setup(cfg: Any, part: str, variables: Any = None) -> tuple[Callable[..., Any], tuple]:
    """One part of the VIPA inference forward (`part_functions`: total, encoder, swin, bert,
    advanced_lang, veg, decoder) on random inputs of the shapes the full forward feeds it, batch
    1 -> (fn, args): `fn(*args)` runs it; `args` = (variables, *inputs) on the device."""
    import jax
    import jax.numpy as jnp

    from vipa_jax.models.vipa import build_model, with_inference_cache

    model = build_model(cfg)
    fns = part_functions(model, cfg)
    if part not in fns:
        raise ValueError(f"part must be one of {sorted(fns)}, got {part!r}")
    if variables is None:
        variables = random_model_variables(model, cfg)
    fn, which = fns[part]
    rng = np.random.default_rng(0)
    abstract = abstract_inputs(model, variables, cfg)
    inputs = jax.tree.map(  # token ids and masks all 1 (a real token, nothing padded)
        lambda s: (rng.standard_normal(s.shape).astype(s.dtype)
                   if jnp.issubdtype(s.dtype, jnp.floating) else np.ones(s.shape, s.dtype)),
        abstract[which])
    # as inference runs them, with what it precomputes from the params (`with_inference_cache`)
    variables = with_inference_cache(model, variables, *abstract["full"])
    return fn, (variables, *jax.device_put(inputs))


def flop_breakdown(
    model: Any, variables: Any, cfg: Any, compile_parts: bool = True,
) -> tuple[dict[str, dict[str, float]], Any]:
    """{part: {xla_flops, macs, ...}} and the compiled total (for timing)."""
    import jax

    fns = part_functions(model, cfg)
    inputs = abstract_inputs(model, variables, cfg)
    out: dict[str, dict[str, float]] = {}
    compiled_total = None
    for name, (fn, which) in fns.items():
        args = (variables, *inputs[which])
        entry: dict[str, float] = {"macs": float(common.count_macs(fn, *args))}
        if name == "total" or compile_parts:
            compiled, info = common.compile_jax(fn, *args)
            entry.update(xla_flops=info["flops"], compile_s=info["compile_s"],
                         transcendentals=info.get("transcendentals", 0.0))
            if name == "total":
                compiled_total = compiled
                entry["xla_flops_before_optimization"] = common.cost_of(
                    jax.jit(fn).lower(*args))["flops"]
        else:
            entry.update(xla_flops=common.cost_of(jax.jit(fn).lower(*args))["flops"])
        out[name] = entry
        print(f"  {name:14s} {entry['xla_flops'] / 1e9:9.2f} XLA GFLOPs "
              f"{entry['macs'] / 1e9:9.2f} GMACs", flush=True)
    for key in ("xla_flops", "macs"):
        enc = out["encoder"][key]
        out.setdefault("fusion", {})[key] = enc - out["swin"][key] - out["bert"][key]
        parts = enc + sum(out[p][key] for p in ("advanced_lang", "veg", "decoder"))
        out.setdefault("residual", {})[key] = out["total"][key] - parts
    return out, compiled_total


def run(
    quick: bool = False, iters: int = 3, time_model: bool = True, torch_baseline: bool = True,
    compile_parts: bool = True, out_dir: str | None = None, write: bool = True,
) -> dict[str, Any]:
    import jax

    from vipa_jax.backend import target_backend
    from vipa_jax.models.decoder import resolve_conv_impl
    from vipa_jax.models.swin import SwinTransformer
    from vipa_jax.models.vipa import build_model, init_variables, with_inference_cache

    if quick:  # smoke test: the parts' XLA flops from the unoptimized HLO (no compiles)
        iters, compile_parts = 2, False
    cfg = _config(quick).model
    # FLOPs of the architecture: the decoder's 3x3 convolutions as direct convolutions (the
    # Winograd ones the CPU default runs do fewer multiply-adds); the timing runs the config.
    count_cfg = cfg.copy_and_resolve_references()
    count_cfg.decoder.conv_impl = "xla"
    model = build_model(count_cfg)
    t0 = time.perf_counter()
    shapes = jax.eval_shape(
        lambda k: init_variables(model, k, cfg.image_size, cfg.max_tokens), jax.random.key(0))
    params = count_params(shapes["params"])
    print(f"VIPA {'quick (synthetic:test)' if quick else 'paper (refcoco)'} config, "
          f"{cfg.image_size}x{cfg.image_size}, {cfg.max_tokens} tokens, batch 1, inference")
    flops, compiled = flop_breakdown(model, shapes, count_cfg, compile_parts)
    padding = SwinTransformer.from_config(cfg.swin).window_padding_macs((cfg.image_size,) * 2)
    result: dict[str, Any] = {
        "quick": quick, "config": "synthetic:test" if quick else "refcoco",
        "image_size": cfg.image_size, "max_tokens": cfg.max_tokens, "batch": 1,
        "paper_gflops": PAPER_GFLOPS, "params": params,
        "gflops": {k: {"xla": v["xla_flops"] / 1e9, "gmacs": v["macs"] / 1e9,
                       "two_x_gmacs": 2 * v["macs"] / 1e9} for k, v in flops.items()},
        "swin_window_padding_gmacs": padding / 1e9,
        "flops_detail": flops, "analysis_s": time.perf_counter() - t0,
    }
    result["note"] = convention_note(result)
    if time_model:
        conv_impl = resolve_conv_impl(cfg.decoder.conv_impl)
        if conv_impl != "xla" or target_backend() == "cpu":
            # time the configured model with its inference caches (`with_inference_cache`)
            timed = build_model(cfg)
            fn, which = part_functions(timed, cfg)["total"]
            inputs = abstract_inputs(model, shapes, cfg)[which]
            compiled = common.compile_jax(fn, with_inference_cache(timed, shapes, *inputs),
                                          *inputs)[0]
        result["timing"] = time_forward(compiled, shapes, cfg, iters, torch_baseline, quick)
        result["timing"]["conv_impl"] = conv_impl
    _print(result)
    if write:
        result["path"] = common.write_result("model", result, out_dir)
        print("wrote", result["path"])
    return result


def inference_variables(cfg: Any, variables: Any, *inputs: Any) -> Any:
    """`variables` + the caches the model config `cfg` uses at inference on `inputs`."""
    from vipa_jax.models.vipa import build_model, with_inference_cache

    return with_inference_cache(build_model(cfg), variables, *inputs)


def time_forward(
    compiled: Any, shapes: Any, cfg: Any, iters: int, torch_baseline: bool, quick: bool,
    variants: dict[str, tuple[Any, Any]] | None = None,
) -> dict[str, Any]:
    """Median forward time of the compiled full model, and of PyTorch Swin + BERT backbones.

    `compiled` runs the model config `cfg` on the random variables of `shapes` plus their
    Winograd cache (`inference_variables`). `variants`: {name: (another compiled forward of the
    same signature, its model config, e.g. another `decoder.conv_impl`)}, timed in the same
    alternating blocks as `vipa_jax:<name>`.
    """
    import jax

    variables = random_variables(shapes)
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.standard_normal(
        (1, cfg.image_size, cfg.image_size, 3), np.float32))
    n = cfg.max_tokens
    ids = rng.integers(1, cfg.bert.vocab_size, (1, n)).astype(np.int32)
    mask = np.ones((1, n), np.int32)
    mask[:, max(2, n - 5):] = 0
    inputs = (images, *jax.device_put((ids, mask)))  # all on the device: no copy per call
    main = inference_variables(cfg, variables, *inputs)
    fns: dict[str, Callable[[], Any]] = {"vipa_jax": lambda: compiled(main, *inputs)}
    for name, (fn, fn_cfg) in (variants or {}).items():
        v = inference_variables(fn_cfg, variables, *inputs)
        fns[f"vipa_jax:{name}"] = lambda fn=fn, v=v: fn(v, *inputs)
    if torch_baseline:
        import torch

        from benchmarks.backbones import BERT_BASE, QUICK_BERT, build_bert, build_swin

        torch.set_num_threads(common.cpu_count())
        swin_cfg = {k: cfg.swin[k] for k in ("embed_dim", "depths", "num_heads", "window_size")}
        bert_cfg = dict(QUICK_BERT if quick else BERT_BASE)
        hf_swin = build_swin(swin_cfg)[0]
        hf_bert = build_bert(bert_cfg)[0]
        img_t = torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)))
        ids_t = torch.from_numpy(ids.astype(np.int64) % bert_cfg["vocab_size"])
        mask_t = torch.from_numpy(mask.astype(np.int64))

        def torch_backbones() -> Any:
            with torch.inference_mode():
                return hf_swin(img_t).feature_maps, hf_bert(ids_t, attention_mask=mask_t)

        fns["torch_swin_bert"] = torch_backbones
    load = common.load_snapshot()
    timings = common.time_calls(fns, iters=iters, warmup=1)
    out: dict[str, Any] = {"iters": iters, "threads": common.cpu_count(), "load_before": load,
                           "load_after": common.load_snapshot(), **timings}
    if torch_baseline:
        torch_s = timings["torch_swin_bert"]["median_s"]
        out["ratio_vipa_over_torch_backbones"] = timings["vipa_jax"]["median_s"] / torch_s
        for name in variants or {}:
            out[f"ratio_vipa:{name}_over_torch_backbones"] = (
                timings[f"vipa_jax:{name}"]["median_s"] / torch_s)
        out["target_ratio"] = 1.2
    return out


def convention_note(result: dict[str, Any]) -> str:
    """Which convention the paper's number matches, from the measured counts."""
    g = result["gflops"]["total"]
    pad = result.get("swin_window_padding_gmacs", 0.0)
    ref = g["gmacs"] + pad  # what the PyTorch reference computes
    candidates = {"MACs (fvcore's 'FLOPs')": ref, "2 x MACs": 2 * ref, "XLA flops": g["xla"]}
    best = min(candidates, key=lambda k: abs(candidates[k] - PAPER_GFLOPS))
    off = 100 * (candidates[best] - PAPER_GFLOPS) / PAPER_GFLOPS
    return (
        f"XLA counts {g['xla']:.1f} GFLOPs (2 per multiply-add, + elementwise ops, minus conv "
        f"taps on zero padding); the matmuls/convs are {g['gmacs']:.1f} GMACs = "
        f"{g['two_x_gmacs']:.1f} GFLOPs at 2 per MAC. The reference Swin also projects its "
        f"window padding (+{pad:.1f} GMACs, skipped here): {ref:.1f} GMACs, which fvcore-style "
        f"counters (LAVT, CrossVLT, Swin) print as 'GFLOPs'. The paper's {PAPER_GFLOPS:.0f} "
        f"GFLOPs is closest to the reference's {best} count ({off:+.1f}%)."
    )


def _print(result: dict[str, Any]) -> None:
    g, p = result["gflops"], result["params"]
    rows = []
    for name in ("swin", "bert", "fusion", "advanced_lang", "veg", "decoder", "residual", "total"):
        rows.append([name, g[name]["xla"], g[name]["gmacs"], g[name]["two_x_gmacs"],
                     p.get(name, 0) / 1e6 if name != "residual" else 0.0])
    common.print_table(rows, ["part", "XLA GFLOPs", "GMACs", "2xGMACs", "params (M)"],
                       title=f"paper: {PAPER_GFLOPS:.0f} GFLOPs; BERT word embeddings "
                             f"{p['bert_word_embeddings'] / 1e6:.1f}M params of bert")
    print(result["note"])
    t = result.get("timing")
    if t:
        v = t["vipa_jax"]
        line = (f"forward, batch 1, CPU x{t['threads']}: VIPA (jax) median "
                f"{v['median_s'] * 1e3:.0f} ms (p90 {v['p90_s'] * 1e3:.0f})")
        if "torch_swin_bert" in t:
            line += (f"; PyTorch Swin+BERT backbones median "
                     f"{t['torch_swin_bert']['median_s'] * 1e3:.0f} ms; ratio "
                     f"{t['ratio_vipa_over_torch_backbones']:.2f} (target <= 1.2)")
        print(line + f"; load {t['load_before']}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny synthetic:test config")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--no-time", action="store_true", help="FLOPs and params only")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch backbone baseline")
    p.add_argument("--lowered-parts", action="store_true",
                   help="parts' XLA flops from the unoptimized HLO (no compile; faster)")
    p.add_argument("--threads", type=int, default=None, help="pin to this many CPUs")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.threads:
        common.pin_cpus(a.threads)
    run(a.quick, a.iters, not a.no_time, not a.no_torch, not a.lowered_parts, a.out)


if __name__ == "__main__":
    main()
