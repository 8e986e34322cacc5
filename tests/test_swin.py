"""Swin backbone: PyTorch (HF transformers) parity, checkpoint loaders, shapes, drop-path, remat."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vipa_jax.models.swin import (
    SWIN_CONFIGS,
    SwinTransformer,
    has_block_pairs,
    relative_position_index,
    shift_attention_mask,
    stack_block_pairs,
    unstack_block_pairs,
)
from vipa_jax.weights.swin import load_swin_params, save_swin_params

TOL = 1e-4
STAGE_NORMS = [f"norm_{i}/{p}" for i in range(4) for p in ("bias", "scale")]

SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
SWIN_B_SHAPED = dict(embed_dim=128, depths=(2, 2, 2, 2), num_heads=(4, 8, 16, 32), window_size=12)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def _hf_backbone(cfg: dict[str, Any], seed: int = 0) -> Any:
    """Random-weight HF SwinBackbone (eval mode) with every parameter re-drawn non-trivially."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.SwinConfig(
        embed_dim=cfg["embed_dim"], depths=list(cfg["depths"]), num_heads=list(cfg["num_heads"]),
        window_size=cfg["window_size"], image_size=224,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    assert config.layer_norm_eps == 1e-5, config.layer_norm_eps
    torch.manual_seed(seed)
    model = transformers.SwinBackbone(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("relative_position_bias_table"):
                p.copy_(noise)  # O(1) biases so the table and its indexing matter
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(noise / np.sqrt(fan_in))
    return model


def _images(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(B, H, W, 3) float32 normal noise."""
    return np.random.default_rng(seed).standard_normal((batch, height, width, 3), np.float32)


def _nchw(x: np.ndarray) -> Any:
    """(B, H, W, C) numpy -> torch (B, C, H, W)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _raw_stages(module: SwinTransformer, images: jax.Array) -> list[jax.Array]:
    """Stage outputs before the per-stage norms, via the decomposed API."""
    x = module.embed(images)
    outs = []
    for i in range(module.num_stages):
        x = module.run_stage(i, x)
        outs.append(x)
        if i < module.num_stages - 1:
            x = module.merge(i, x)
    return outs


def _max_diffs(ours: list[jax.Array], ref: list[Any]) -> list[float]:
    """Per-stage max |ours - ref|; ref is torch (B, C, H, W)."""
    diffs = []
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        b = b.detach().numpy().transpose(0, 2, 3, 1)
        assert a.shape == b.shape, f"stage {i}: ours {a.shape} vs torch {b.shape}"
        diffs.append(float(np.max(np.abs(np.asarray(a) - b))))
    return diffs


def _assert_tree_equal(a: Any, b: Any, skip: tuple[str, ...] = ()) -> None:
    """Exact equality of two params trees (paths in `skip` ignored)."""
    fa = {"/".join(k): v for k, v in _flat(a).items()}
    fb = {"/".join(k): v for k, v in _flat(b).items()}
    assert sorted(fa) == sorted(fb)
    for k in fa:
        if k.startswith(skip):
            continue
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    from flax.traverse_util import flatten_dict

    return flatten_dict(dict(tree))


def _parity_backbone(cfg: dict[str, Any], hw: tuple[int, int], batch: int) -> list[float]:
    """Max diff per stage between our SwinTransformer and HF SwinBackbone feature maps."""
    import torch

    hf = _hf_backbone(cfg)
    model = SwinTransformer(**cfg)
    params, report = load_swin_params(hf.state_dict(), model)
    assert report.source_format == "hf" and report.missing == [], report.missing
    images = _images(batch, *hw)
    with torch.no_grad():
        ref = hf(_nchw(images)).feature_maps
    with jax.default_matmul_precision("float32"):
        ours = jax.jit(model.apply)({"params": params}, images)
    return _max_diffs(ours, ref)


# ------------------------------------------------------------------------------------------
# PyTorch parity
# ------------------------------------------------------------------------------------------


def test_parity_small_vs_hf_backbone() -> None:
    """Window 7 at 70x94: stages 18x24, 9x12, 5x6, 3x3 (the last two padded to 7x7 and shifted)."""
    diffs = _parity_backbone(dict(SMALL, window_size=7), (70, 94), batch=2)
    print("small w7 70x94 vs HF SwinBackbone, max |diff| per stage:", diffs)
    assert max(diffs) <= TOL, f"max abs diff per stage {diffs} > {TOL}"


def test_parity_small_vs_hf_swinmodel_clamped_window() -> None:
    """always_partition=False = HF SwinModel: stage 4 is 4x5 with window 4 -> no shift."""
    import torch

    cfg = dict(SMALL, window_size=4)
    hf = _hf_backbone(cfg, seed=1)
    sd = {k.removeprefix("swin."): v for k, v in hf.state_dict().items()
          if not k.startswith("hidden_states_norms")}  # a plain SwinModel state dict
    model = SwinTransformer(**cfg, always_partition=False)
    params, report = load_swin_params(sd, model)
    assert report.missing == STAGE_NORMS, report.missing
    assert "layernorm.weight" in report.skipped, report.skipped
    assert (params["norm_3"]["scale"] == 1).all() and (params["norm_3"]["bias"] == 0).all()
    images = _images(1, 100, 132, seed=1)
    with torch.no_grad():
        out = hf.swin(_nchw(images), output_hidden_states=True,
                      output_hidden_states_before_downsampling=True)
    with jax.default_matmul_precision("float32"):
        ours = jax.jit(functools.partial(model.apply, method=_raw_stages))(
            {"params": params}, images)
    diffs = _max_diffs(ours, out.reshaped_hidden_states[1:])
    print("small w4 100x132 vs HF SwinModel (pre-downsampling states), max |diff|:", diffs)
    assert [o.shape[1:3] for o in ours] == [(25, 33), (13, 17), (7, 9), (4, 5)]
    assert max(diffs) <= TOL, f"max abs diff per stage {diffs} > {TOL}"
    # The segmentation behaviour differs exactly where the window is clamped (stage 4 only).
    seg = SwinTransformer(**cfg, always_partition=True)
    seg_out = jax.jit(functools.partial(seg.apply, method=_raw_stages))(
        {"params": params}, images)
    seg_diffs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(seg_out, ours, strict=True)]
    assert max(seg_diffs[:3]) == 0.0 and seg_diffs[3] > 1e-2, seg_diffs


def test_parity_swin_b_shaped_vs_hf_backbone() -> None:
    """Swin-B widths/heads, window 12, depths (2,2,2,2), at 100x132 (pads 25->36, 13->24, ...)."""
    diffs = _parity_backbone(SWIN_B_SHAPED, (100, 132), batch=1)
    print("Swin-B-shaped w12 100x132 vs HF SwinBackbone, max |diff| per stage:", diffs)
    assert max(diffs) <= TOL, f"max abs diff per stage {diffs} > {TOL}"


@pytest.mark.slow
def test_parity_full_swin_b_at_480_vs_hf_backbone() -> None:
    """The paper's backbone: Swin-B w12, depths (2,2,18,2), 480x480 (30->36 and 15->24 padding)."""
    diffs = _parity_backbone(dict(SWIN_CONFIGS["base"]), (480, 480), batch=1)
    print("Swin-B w12 480x480 vs HF SwinBackbone, max |diff| per stage:", diffs)
    assert max(diffs) <= TOL, f"max abs diff per stage {diffs} > {TOL}"


# ------------------------------------------------------------------------------------------
# loaders
# ------------------------------------------------------------------------------------------


def _official_state_dict(hf: Any) -> dict[str, Any]:
    """Rename an HF SwinBackbone state dict to Microsoft's classification-checkpoint naming."""
    import torch

    sd = {k.removeprefix("swin."): v for k, v in hf.state_dict().items()}
    out: dict[str, Any] = {
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "patch_embed.norm.weight": sd["embeddings.norm.weight"],
        "patch_embed.norm.bias": sd["embeddings.norm.bias"],
        "norm.weight": sd["layernorm.weight"],  # classifier norm: must be skipped
        "norm.bias": sd["layernorm.bias"],
        "head.weight": torch.zeros(10, sd["layernorm.weight"].shape[0]),
        "head.bias": torch.zeros(10),
    }
    renames = {
        "layernorm_before": "norm1", "layernorm_after": "norm2", "attention.o_proj": "attn.proj",
        "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
        "attention.relative_position_bias": "attn",  # .relative_position_bias_table
    }
    for key, value in sd.items():
        if not key.startswith("encoder.layers."):
            continue
        key = key.removeprefix("encoder.")
        if ".downsample." in key:
            out[key] = value
            continue
        prefix, _, rest = key.partition(".blocks.")
        j, _, name = rest.partition(".")
        base = f"{prefix}.blocks.{j}."
        for src, dst in renames.items():
            if name.startswith(src + "."):
                out[base + dst + name[len(src):]] = value
        if name.startswith("attention.q_proj."):
            suffix = name.rsplit(".", 1)[1]
            parts = [sd[f"encoder.{base}attention.{p}_proj.{suffix}"] for p in "qkv"]
            out[base + "attn.qkv." + suffix] = torch.cat(parts, dim=0)
            w = hf.config.window_size
            out[base + "attn.relative_position_index"] = torch.zeros(w * w, w * w)
            out[base + "attn_mask"] = torch.zeros(1)
    return out


def test_official_loader_matches_hf_loader(tmp_path: Any) -> None:
    """Official naming (fused qkv, .pth wrapped in {'model': sd}) loads the same params."""
    import torch

    cfg = dict(SMALL, window_size=7)
    hf = _hf_backbone(cfg, seed=2)
    model = SwinTransformer(**cfg)
    hf_params, _ = load_swin_params(hf.state_dict(), model)
    init = jax.tree.map(lambda x: x + 1.0, hf_params)  # distinguishable stage-norm values
    path = tmp_path / "swin_official.pth"
    torch.save({"model": _official_state_dict(hf)}, path)
    params, report = load_swin_params(path, model, init)
    assert report.source_format == "official"
    assert report.missing == STAGE_NORMS, report.missing
    assert {"norm.weight", "head.weight"} <= set(report.skipped), report.skipped
    assert any(k.endswith("relative_position_index") for k in report.skipped)
    _assert_tree_equal(params, hf_params, skip=("norm_",))
    for i in range(4):  # stage norms keep the init they were given
        np.testing.assert_array_equal(params[f"norm_{i}"]["scale"], init[f"norm_{i}"]["scale"])
    # mmseg/LAVT segmentation checkpoints: `backbone.` prefix and stage norms norm0..norm3.
    seg_sd = {f"backbone.{k}": v for k, v in _official_state_dict(hf).items()}
    hf_sd = hf.state_dict()
    for i in range(4):
        for p in ("weight", "bias"):
            seg_sd[f"backbone.norm{i}.{p}"] = hf_sd[f"hidden_states_norms.stage{i + 1}.{p}"]
    seg_params, seg_report = load_swin_params(seg_sd, model, init)
    assert seg_report.missing == [], seg_report.missing
    _assert_tree_equal(seg_params, hf_params)
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        load_swin_params({k: v for k, v in _official_state_dict(hf).items()
                          if not k.startswith("layers.3.")}, model)


def test_loader_rejects_wrong_window() -> None:
    """A window-7 table (169 rows) into a window-4 model (49 rows) names key, shapes, windows."""
    hf = _hf_backbone(dict(SMALL, window_size=7), seed=4)
    model = SwinTransformer(**SMALL, window_size=4)
    with pytest.raises(ValueError) as err:
        load_swin_params(_official_state_dict(hf), model)
    msg = str(err.value)
    assert "layers_0/blocks_0/relative_position_bias_table: expected shape (49, 1), " \
           "checkpoint has (169, 1)" in msg, msg
    assert "checkpoint window 7, model window 4" in msg, msg


def test_hf_safetensors_folder_loads_same_params(tmp_path: Any) -> None:
    """save_pretrained writes on-disk names (attention.self.query...); loading the folder agrees."""
    cfg = dict(SMALL, window_size=7)
    hf = _hf_backbone(cfg, seed=5)
    hf.save_pretrained(tmp_path)
    model = SwinTransformer(**cfg)
    from_folder, report = load_swin_params(tmp_path, model)
    from_memory, _ = load_swin_params(hf.state_dict(), model)
    assert report.missing == [] and report.source_format == "hf"
    assert any("attention.self.query" in k for k in _safetensor_keys(tmp_path))
    _assert_tree_equal(from_folder, from_memory)


def _safetensor_keys(folder: Any) -> list[str]:
    from safetensors.numpy import load_file

    return list(load_file(str(folder / "model.safetensors")))


# ------------------------------------------------------------------------------------------
# shapes, config, window helpers
# ------------------------------------------------------------------------------------------


def test_paper_config_shapes_at_480() -> None:
    """Swin-B w12 at 480x480 (eval_shape only): 120²x128, 60²x256, 30²x512, 15²x1024."""
    model = SwinTransformer.from_config("base")
    images = jax.ShapeDtypeStruct((2, 480, 480, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    outs = jax.eval_shape(model.apply, variables, images)
    assert [o.shape for o in outs] == [
        (2, 120, 120, 128), (2, 60, 60, 256), (2, 30, 30, 512), (2, 15, 15, 1024)
    ]
    p = variables["params"]
    assert len(p["layers_2"]) == 18
    assert p["layers_0"]["blocks_0"]["relative_position_bias_table"].shape == (529, 4)
    assert p["layers_3"]["blocks_1"]["relative_position_bias_table"].shape == (529, 32)
    assert p["downsample_2"]["reduction"]["kernel"].shape == (2048, 1024)
    n_params = sum(x.size for x in jax.tree.leaves(p))
    # HF SwinModel(Swin-B) has 86,878,584 params incl. its 2,048-param final layernorm; we
    # replace that with the 4 stage norms (2 * (128 + 256 + 512 + 1024) = 3,840).
    assert n_params == 86_878_584 - 2_048 + 3_840, n_params
    assert "downsample_3" not in p


def test_from_config_accepts_presets_dicts_and_configdicts() -> None:
    """Preset names, plain dicts and ml_collections configs build the same module."""
    cd = ml_collections.ConfigDict(dict(
        embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12,
        mlp_ratio=4.0, drop_path_rate=0.3, patch_size=4))
    from_cd = SwinTransformer.from_config(cd, dtype="bfloat16")
    assert from_cd == SwinTransformer.from_config("base", drop_path_rate=0.3, dtype=jnp.bfloat16)
    assert from_cd.depths == (2, 2, 18, 2) and from_cd.dtype == jnp.bfloat16
    assert SwinTransformer.from_config("tiny").num_features == (96, 192, 384, 768)
    assert set(SWIN_CONFIGS) == {"tiny", "small", "base", "large"}
    with pytest.raises(ValueError, match="unknown Swin config keys.*'windw_size'"):
        SwinTransformer.from_config({"windw_size": 7})


def test_relative_position_index_sub_window_uses_same_offsets() -> None:
    """A 3x3 window read from a 7x7 table picks the entries the 7x7 window uses for those pairs."""
    full = relative_position_index(7)  # (49, 49)
    assert full.max() == 13 * 13 - 1 and full[0, 0] == 6 * 13 + 6
    sub = relative_position_index(3, table_window=7)  # (9, 9)
    tokens = [r * 7 + c for r in range(3) for c in range(3)]  # top-left 3x3 of the 7x7 window
    np.testing.assert_array_equal(sub, full[np.ix_(tokens, tokens)])


@pytest.mark.parametrize("shape", [(6, 7), (8, 8)])
def test_block_projects_only_the_real_tokens(shape: tuple[int, int]) -> None:
    """A block's q/k/v/out projections and MLP run on the H·W real tokens; only attention runs
    on the padded map. (The padded tokens' q/k/v are the biases: the HF parity tests above, on
    maps that need padding, check the result; this checks the MACs it saves.)"""
    from benchmarks.common import count_macs
    from vipa_jax.models.swin import SwinBlock

    c, window, heads = 8, 4, 2
    h, w = shape
    hp, wp = -(-h // window) * window, -(-w // window) * window
    block = SwinBlock(num_heads=heads, window_size=window, shift_size=window // 2)
    x = jnp.ones((1, h, w, c))
    params = block.init(jax.random.PRNGKey(0), x)
    macs = count_macs(block.apply, params, x)
    tokens, padded = h * w, hp * wp
    expected = (4 * tokens * c * c  # query, key, value, out
                + 2 * padded * window**2 * c  # q·kᵀ and weights·v, per window
                + 2 * tokens * c * 4 * c)  # MLP
    assert macs == expected, (macs, expected)


def test_macs_plus_skipped_padding_equal_pytorch_swin() -> None:
    """Our Swin's multiply-adds + `window_padding_macs` = those PyTorch's FLOP counter counts on HF
    SwinBackbone, which projects the window padding (Swin-B at 480: 74.82 + 10.42 = 85.24 G)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.common import count_macs

    cfg, hw = dict(SMALL, window_size=7), (70, 94)  # stages 18x24, 9x12, 5x6, 3x3: all padded
    config = transformers.SwinConfig(
        embed_dim=cfg["embed_dim"], depths=list(cfg["depths"]), num_heads=list(cfg["num_heads"]),
        window_size=cfg["window_size"], image_size=224, attn_implementation="eager",
        out_features=["stage1", "stage2", "stage3", "stage4"])  # eager: count q·kᵀ and w·v too
    hf = transformers.SwinBackbone(config).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        hf(torch.zeros(1, 3, *hw))
    ours = SwinTransformer(**cfg)
    x = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
    macs = count_macs(ours.apply, jax.eval_shape(ours.init, jax.random.PRNGKey(0), x), x)
    padding = ours.window_padding_macs(hw)
    assert padding > 0.25 * macs
    assert macs + padding == counter.get_total_flops() // 2


def _assert_same_features_and_grads(model: SwinTransformer, ref: SwinTransformer,
                                    variables: Any, images: jax.Array, *, feature_tol: float,
                                    min_grad_scale: float, layout: Any = None) -> list[jax.Array]:
    """`model`'s features equal `ref`'s (to `feature_tol`) and so do the gradients of Σ f·sin f
    (to 1e-5 of the largest, which must exceed `min_grad_scale`); -> `model`'s features.
    `layout` maps `ref`'s variables (and gradients) to `model`'s tree (default: the same)."""
    layout = layout or (lambda tree: tree)

    def features_and_grads(m: SwinTransformer, v: Any) -> Any:
        def loss(v: Any) -> Any:
            feats = m.apply(v, images)
            return sum(jnp.sum(f * jnp.sin(f)) for f in feats), feats

        (_, feats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(v)
        return feats, grads

    (out, g), (want, g_ref) = (features_and_grads(model, layout(variables)),
                               features_and_grads(ref, variables))
    for a, b in zip(out, want, strict=True):
        np.testing.assert_allclose(a, b, atol=feature_tol, rtol=feature_tol)
    g_ref = layout(g_ref)
    assert jax.tree.structure(g) == jax.tree.structure(g_ref)
    scale = max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(g_ref))
    assert scale > min_grad_scale
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5 * scale)
    return out


@pytest.mark.parametrize("variant", [
    dict(attention_impl="xla"),
    dict(attention_softmax="normalized"),
    dict(attention_softmax="compact"),
    dict(qkv_projection="fused"),
    dict(attention_softmax="normalized", qkv_projection="fused"),
], ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
def test_attention_variants_match_einsum(variant: dict[str, str]) -> None:
    """swin.attention_impl='xla' (jax.nn.dot_product_attention, windows folded into heads), the
    textbook softmax and the fused q/k/v projection (padded: one regroup with the concatenated
    biases as fill) each give the einsum implementation's features and gradients (deferred
    division, separate projections) on a padded, shifted Swin. ('cudnn' is the 'xla' call with
    another backend; it needs a GPU: benchmarks/attention.py.)"""
    cfg = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=7)
    x = jnp.asarray(_images(2, 38, 50))  # maps 10x13 -> 14x14 and 5x7 -> 7x7 (padded)
    ref_model = SwinTransformer(**cfg, attention_softmax="deferred", qkv_projection="separate")
    params = ref_model.init(jax.random.PRNGKey(0), x)
    params = jax.tree.map(  # O(1) relative-position biases, so the bias folding matters
        lambda p: p * 50.0 if p.ndim == 2 and p.shape[0] == 13 * 13 else p, params)

    _assert_same_features_and_grads(SwinTransformer(**cfg, **variant), ref_model, params, x,
                                    feature_tol=1e-4, min_grad_scale=1.0)
    key, value = next(iter(variant.items()))
    with pytest.raises(ValueError, match=f"swin.{key} must be one of"):
        SwinTransformer(**cfg, **{key: value + "_bad"}).init(jax.random.PRNGKey(0), x)


def test_shift_mask_regions() -> None:
    """On an 8x8 map with window 4, shift 2: window 0 unmasked, the last window has 4 regions."""
    mask = np.asarray(shift_attention_mask(8, 8, 4, 2))  # (4, 16, 16)
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()
    # last window: 4 regions of 4 tokens -> each token attends 4 of 16 keys
    assert ((mask[3] == 0).sum(-1) == 4).all()
    assert set(np.unique(mask)) == {0.0, -100.0}


# ------------------------------------------------------------------------------------------
# drop-path, remat, dtype
# ------------------------------------------------------------------------------------------

TINY = dict(embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=4)
ONE_STAGE = dict(embed_dim=8, depths=(2,), num_heads=(2,), window_size=4)


def test_drop_path_deterministic_and_train_mode() -> None:
    """deterministic=True ignores rngs; train mode with rate>0 is random per 'dropout' rng."""
    model = SwinTransformer(**TINY, drop_path_rate=0.5)
    images = jnp.asarray(_images(4, 30, 26))
    variables = jax.jit(model.init)(jax.random.key(0), images)
    apply = jax.jit(model.apply, static_argnames="deterministic")

    def run(deterministic: bool, seed: int) -> list[jax.Array]:
        return apply(variables, images, deterministic=deterministic,
                     rngs={"dropout": jax.random.key(seed)})

    eval_a, eval_b = run(True, 1), run(True, 2)
    train_a, train_a2, train_b = run(False, 1), run(False, 1), run(False, 2)
    for i in range(2):
        np.testing.assert_array_equal(eval_a[i], eval_b[i])
        np.testing.assert_array_equal(train_a[i], train_a2[i])
        assert float(jnp.max(jnp.abs(train_a[i] - eval_a[i]))) > 1e-3
        assert float(jnp.max(jnp.abs(train_a[i] - train_b[i]))) > 1e-3
    no_drop = SwinTransformer(**TINY, drop_path_rate=0.0)
    no_drop_train = jax.jit(no_drop.apply, static_argnames="deterministic")(
        variables, images, deterministic=False)  # needs no 'dropout' rng at rate 0
    np.testing.assert_allclose(no_drop_train[1], eval_a[1], atol=1e-6)


def test_remat_same_params_outputs_and_grads() -> None:
    """remat=True keeps the param tree and gives the same outputs and gradients."""
    images = jnp.asarray(_images(2, 30, 26))
    plain, remat = SwinTransformer(**ONE_STAGE), SwinTransformer(**ONE_STAGE, remat=True)
    params = plain.init(jax.random.key(0), images)["params"]
    remat_shapes = jax.eval_shape(remat.init, jax.random.key(0), images)["params"]
    assert jax.tree.structure(params) == jax.tree.structure(remat_shapes)

    def loss(p: Any, m: SwinTransformer) -> jax.Array:
        return sum(jnp.sum(o**2) for o in m.apply({"params": p}, images))

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    l1, g1 = grad(params, plain)
    l2, g2 = grad(params, remat)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("remat", [False, True])
def test_scan_blocks_same_params_outputs_and_grads(remat: bool) -> None:
    """scan_blocks=True runs a stage's block pairs as one lax.scan (5 blocks: 2 pairs scanned,
    the last block unrolled) with the unrolled stage's parameter tree, features and gradients;
    in train mode drop-path still draws per 'dropout' rng, and a rate of 0 needs no rng."""
    cfg = dict(embed_dim=8, depths=(2, 5), num_heads=(1, 2), window_size=4, remat=remat)
    images = jnp.asarray(_images(2, 38, 50))  # stage 2: 5x7 map, padded to 8x8, shifted
    plain = SwinTransformer(**cfg, drop_path_rate=0.3)
    scan = SwinTransformer(**cfg, drop_path_rate=0.3, scan_blocks=True)
    variables = plain.init(jax.random.key(0), images)
    scan_shapes = jax.eval_shape(scan.init, jax.random.key(0), images)
    assert jax.tree.structure(variables) == jax.tree.structure(scan_shapes)
    jaxpr = str(jax.make_jaxpr(lambda v: scan.apply(v, images))(variables))
    assert jaxpr.count("scan[") == 1  # stage 2 only (stage 1 has one pair)

    out = _assert_same_features_and_grads(scan, plain, variables, images, feature_tol=1e-5,
                                          min_grad_scale=0.1)

    train = jax.jit(scan.apply, static_argnames="deterministic")
    t1, t1b, t2 = (train(variables, images, deterministic=False,
                         rngs={"dropout": jax.random.key(k)}) for k in (1, 1, 2))
    np.testing.assert_array_equal(t1[1], t1b[1])
    assert float(jnp.abs(t1[1] - t2[1]).max()) > 1e-3  # random per rng
    assert float(jnp.abs(t1[1] - out[1]).max()) > 1e-3  # drop-path is on
    no_drop = SwinTransformer(**cfg, scan_blocks=True)  # drop_path_rate 0: no 'dropout' rng
    np.testing.assert_allclose(no_drop.apply(variables, images, deterministic=False)[1], out[1],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("remat", [False, True])
def test_stacked_params_same_outputs_and_grads(remat: bool) -> None:
    """stacked_params=True stores the scanned pairs' parameters as `block_pairs` (5 blocks: 2
    pairs stacked, block 4 apart): its init has the tree `stack_block_pairs` makes of the
    unrolled one, and on the same (stacked) weights it gives the unrolled stage's features and
    (stacked) gradients; one scan, and no stacking of parameters at call time."""
    cfg = dict(embed_dim=8, depths=(2, 5), num_heads=(1, 2), window_size=4, remat=remat)
    images = jnp.asarray(_images(2, 38, 50))
    plain = SwinTransformer(**cfg, drop_path_rate=0.3)
    stacked = SwinTransformer(**cfg, drop_path_rate=0.3, scan_blocks=True, stacked_params=True)
    variables = plain.init(jax.random.key(0), images)
    own = stacked.init(jax.random.key(0), images)
    assert jax.tree.structure(own) == jax.tree.structure(stack_block_pairs(variables))
    pairs = own["params"]["layers_1"]["block_pairs"]
    assert sorted(own["params"]["layers_1"]) == ["block_pairs", "blocks_4"]
    assert pairs["blocks_1"]["attn"]["query"]["kernel"].shape == (2, 16, 16)
    assert pairs["blocks_0"]["relative_position_bias_table"].shape == (2, 49, 2)
    # the two pairs and their two blocks start from different random weights
    q = pairs["blocks_0"]["attn"]["query"]["kernel"]
    assert float(jnp.abs(q[0] - q[1]).max()) > 1e-3
    assert float(jnp.abs(q[0] - pairs["blocks_1"]["attn"]["query"]["kernel"][0]).max()) > 1e-3
    jaxpr = str(jax.make_jaxpr(lambda v: stacked.apply(v, images))(own))
    assert jaxpr.count("scan[") == 1
    # scan_blocks alone stacks each of the pairs' leaves at call time: one stack per leaf
    scan = SwinTransformer(**cfg, scan_blocks=True)
    scan_jaxpr = str(jax.make_jaxpr(lambda v: scan.apply(v, images))(variables))
    assert scan_jaxpr.count(" stack[") == len(jax.tree.leaves(pairs)) > 0
    assert jaxpr.count(" stack[") == 0

    out = _assert_same_features_and_grads(stacked, plain, variables, images, feature_tol=1e-5,
                                          min_grad_scale=0.1, layout=stack_block_pairs)
    train = jax.jit(stacked.apply, static_argnames="deterministic")
    t1, t2 = (train(stack_block_pairs(variables), images, deterministic=False,
                    rngs={"dropout": jax.random.key(k)}) for k in (1, 2))
    assert float(jnp.abs(t1[1] - t2[1]).max()) > 1e-3  # random per rng
    assert float(jnp.abs(t1[1] - out[1]).max()) > 1e-3  # drop-path is on


def test_stack_block_pairs_round_trip() -> None:
    """`unstack_block_pairs` inverts `stack_block_pairs` (arrays and abstract leaves, inside a
    bigger tree); stages under 4 blocks are left as they are; stacked_params alone is an
    error naming scan_blocks."""
    model = SwinTransformer(embed_dim=8, depths=(3, 6), num_heads=(1, 2), window_size=4)
    images = jnp.asarray(_images(1, 32, 32))
    tree = {"encoder": {"backbone": model.init(jax.random.key(0), images)["params"]}}
    stacked = stack_block_pairs(tree)
    stages = stacked["encoder"]["backbone"]
    assert sorted(k for k in stages["layers_0"] if k.startswith("block")) == [
        "blocks_0", "blocks_1", "blocks_2"]
    assert sorted(k for k in stages["layers_1"] if k.startswith("block")) == ["block_pairs"]
    kernel = stages["layers_1"]["block_pairs"]["blocks_1"]["mlp"]["fc1"]["kernel"]
    np.testing.assert_array_equal(
        kernel[2], tree["encoder"]["backbone"]["layers_1"]["blocks_5"]["mlp"]["fc1"]["kernel"])
    assert has_block_pairs(stacked) and not has_block_pairs(tree)
    assert stack_block_pairs(stacked) == stacked  # already stacked: unchanged
    back = unstack_block_pairs(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(a, b)
    abstract = unstack_block_pairs(jax.eval_shape(lambda: stacked))
    assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(jnp.shape, tree)
    with pytest.raises(ValueError, match="scan_blocks=True"):
        SwinTransformer(embed_dim=8, depths=(4,), num_heads=(1,), window_size=4,
                        stacked_params=True).init(jax.random.key(0), images)


def test_loader_fills_stacked_params_from_hf(tmp_path: Any) -> None:
    """An HF checkpoint loads into a stacked_params model (blocks stacked into `block_pairs`),
    which then matches HF SwinBackbone; `save_swin_params` of the stacked tree writes the blocks
    one by one, and that file loads into the unrolled model as the same weights."""
    import torch

    cfg = dict(SMALL, depths=(2, 4, 2, 2), window_size=4)
    hf = _hf_backbone(cfg)
    model = SwinTransformer(**cfg, scan_blocks=True, stacked_params=True)
    params, report = load_swin_params(hf.state_dict(), model)
    assert report.missing == [] and has_block_pairs(params)
    images = _images(2, 40, 56)
    with torch.no_grad():
        ref = hf(_nchw(images)).feature_maps
    with jax.default_matmul_precision("float32"):
        ours = jax.jit(model.apply)({"params": params}, images)
    diffs = _max_diffs(ours, ref)
    assert max(diffs) <= TOL, f"max abs diff per stage {diffs} > {TOL}"

    path = save_swin_params(params, tmp_path / "stacked.safetensors")
    plain, _ = load_swin_params(path, SwinTransformer(**cfg))
    assert not has_block_pairs(plain)
    # the training loop's form (`train.init_swin`): the target is a stacked tree, not a model
    zeros = jax.tree.map(np.zeros_like, params)
    again, _ = load_swin_params(path, None, zeros)
    assert has_block_pairs(again)
    for tree in (stack_block_pairs(plain), again):
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(a, b)


def test_bias_gradient_kept_apart_on_gpu_only() -> None:
    """Built for a GPU (`compiling_for`), each block's relative-position bias gets a barrier in
    the backward (`layers.materialize_cotangent`), with the same gradients; on the CPU, none."""
    from vipa_jax.backend import compiling_for

    images = jnp.asarray(_images(2, 30, 26))
    model = SwinTransformer(**ONE_STAGE)
    params = model.init(jax.random.key(0), images)["params"]

    def loss(p: Any) -> jax.Array:
        return sum(jnp.sum(o**2) for o in model.apply({"params": p}, images))

    cpu = jax.make_jaxpr(jax.grad(loss))(params)
    g_cpu = jax.grad(loss)(params)
    with compiling_for("gpu"):
        gpu = jax.make_jaxpr(jax.grad(loss))(params)
        g_gpu = jax.grad(loss)(params)  # traced for the GPU, run here
    assert str(cpu).count("optimization_barrier") == 0
    assert str(gpu).count("optimization_barrier") == 2  # one per block
    for a, b in zip(jax.tree.leaves(g_cpu), jax.tree.leaves(g_gpu), strict=True):
        # (the GPU's `auto` forms differ too, e.g. the fused q/k/v projection: rounding only)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params() -> None:
    """dtype=bfloat16: params float32, outputs bfloat16 and close to the float32 model."""
    images = jnp.asarray(_images(1, 30, 26))
    m32, m16 = SwinTransformer(**TINY), SwinTransformer(**TINY, dtype=jnp.bfloat16)
    params = jax.jit(m16.init)(jax.random.key(0), images)["params"]
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    o16 = jax.jit(m16.apply)({"params": params}, images)
    o32 = jax.jit(m32.apply)({"params": params}, images)
    assert all(o.dtype == jnp.bfloat16 for o in o16)
    for a, b in zip(o16, o32, strict=True):
        err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
        assert err < 0.1, err  # normed outputs are O(1); bf16 has ~3 significant digits


def test_decomposed_calls_from_a_parent_module() -> None:
    """A parent (as VIPA's fusion encoder) can drive embed/run_stage/stage_norm/merge itself."""
    import flax.linen as nn

    class Parent(nn.Module):
        def setup(self) -> None:
            self.backbone = SwinTransformer(**TINY)

        def __call__(self, images: jax.Array) -> list[jax.Array]:
            x = self.backbone.embed(images)
            feats = []
            for i in range(self.backbone.num_stages):
                x = self.backbone.run_stage(i, x)
                feats.append(self.backbone.stage_norm(i, x))
                if i < self.backbone.num_stages - 1:
                    x = self.backbone.merge(i, x)
            return feats

    images = jnp.asarray(_images(1, 30, 26))
    variables = jax.jit(Parent().init)(jax.random.key(0), images)
    assert set(variables["params"]) == {"backbone"}
    ours = jax.jit(Parent().apply)(variables, images)
    direct = jax.jit(SwinTransformer(**TINY).apply)({"params": variables["params"]["backbone"]},
                                                    images)
    assert [o.shape for o in ours] == [(1, 8, 7, 8), (1, 4, 4, 16)]
    for a, b in zip(ours, direct, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_absolute_position_embedding_switch() -> None:
    """`ape=True`: a (1, h, w, C) table on the init grid, added to the patch tokens (so the
    output changes by exactly table-dependent amounts), trained, and resized on other grids."""
    kw = dict(embed_dim=8, depths=(1, 1), num_heads=(1, 1), window_size=4)
    plain, ape = SwinTransformer(**kw), SwinTransformer(**kw, ape=True)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    v = ape.init(jax.random.PRNGKey(0), x)
    table = v["params"]["absolute_pos_embed"]["table"]
    assert table.shape == (1, 8, 8, 8)
    assert 0.005 < float(jnp.std(table)) < 0.03  # trunc-normal(0.02)
    # A zero table is exactly the plain backbone.
    zero = jax.tree.map(lambda a: a, v)
    zero["params"]["absolute_pos_embed"]["table"] = jnp.zeros_like(table)
    no_ape = {"params": {k: p for k, p in v["params"].items() if k != "absolute_pos_embed"}}
    np.testing.assert_allclose(ape.apply(zero, x)[-1], plain.apply(no_ape, x)[-1], atol=1e-6)
    assert float(jnp.abs(ape.apply(v, x)[-1] - plain.apply(no_ape, x)[-1]).max()) > 1e-3
    # Position-dependent gradient reaches the table.
    g = jax.grad(lambda p: ape.apply({"params": p}, x)[-1][:, 0].sum())(v["params"])
    assert float(jnp.abs(g["absolute_pos_embed"]["table"]).sum()) > 0
    # Another input size: the table is resized to the new 12×8 grid (corners kept).
    embed = ape.apply(v, jnp.zeros((1, 48, 32, 3)), method=lambda m, im: m.embed(im))
    plain_embed = plain.apply(no_ape, jnp.zeros((1, 48, 32, 3)), method=lambda m, im: m.embed(im))
    pos = embed - plain_embed
    assert pos.shape == (1, 12, 8, 8)
    np.testing.assert_allclose(pos[0, 0, 0], table[0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(pos[0, -1, -1], table[0, -1, -1], atol=1e-6)


def test_sine_ape_init() -> None:
    """`ape_init='sine'`: the table starts as the 2-D sinusoidal code (rows in the first C/2
    channels, columns in the last), in [-1, 1], every cell distinct; bad values are refused."""
    from vipa_jax.models.swin import sine_position_table

    kw = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 1), window_size=4)
    x = jnp.zeros((1, 32, 48, 3))
    v = SwinTransformer(**kw, ape=True, ape_init="sine").init(jax.random.PRNGKey(0), x)
    table = np.asarray(v["params"]["absolute_pos_embed"]["table"])
    assert table.shape == (1, 8, 12, 16)
    np.testing.assert_array_equal(table, sine_position_table(8, 12, 16))
    assert float(np.abs(table).max()) <= 1.0
    # Row code: constant along a row, first C/2 channels; column code: constant down a column.
    np.testing.assert_array_equal(table[0, :, 0, :8], table[0, :, 5, :8])
    np.testing.assert_array_equal(table[0, 0, :, 8:], table[0, 7, :, 8:])
    # Lowest frequency (1/2 cycle over the grid): its cos falls monotonically left to right.
    assert np.all(np.diff(table[0, 0, :, 8 + 4]) < 0)
    flat = table[0].reshape(-1, 16)
    dists = np.linalg.norm(flat[:, None] - flat[None], axis=-1) + np.eye(len(flat))
    assert dists.min() > 0.1
    # Same in a hand-checked spot: row 0 of 8, quarter 4, channel 0 = sin(0.5 · 2π · 0.5/8).
    np.testing.assert_allclose(table[0, 0, 0, 0], np.sin(0.5 * 2 * np.pi * 0.5 / 8), rtol=1e-6)
    with pytest.raises(ValueError, match="ape_init must be one of"):
        SwinTransformer(**kw, ape=True, ape_init="learned").init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="divisible by 4"):
        sine_position_table(4, 4, 6)


def test_own_safetensors_round_trip_and_wrong_architecture(tmp_path: Any) -> None:
    """save_swin_params -> load_swin_params is exact ('vipa_jax' format); a checkpoint of another
    architecture is refused with the offending path named."""
    from vipa_jax.weights.swin import save_swin_params

    model = SwinTransformer(embed_dim=8, depths=(1, 1), num_heads=(1, 1), window_size=4)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    path = save_swin_params(params, tmp_path / "swin.safetensors")
    loaded, report = load_swin_params(path, model)
    assert report.source_format == "vipa_jax" and not report.missing
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    wider = SwinTransformer(embed_dim=16, depths=(1, 1), num_heads=(1, 1), window_size=4)
    with pytest.raises(ValueError, match="patch_embed/proj/kernel: expected shape"):
        load_swin_params(path, wider)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_swin_params(params, tmp_path / "swin.msgpack")


def test_checkpoint_without_ape_loads_into_ape_model(tmp_path: Any) -> None:
    """An ape=False checkpoint loads into an ape=True model: every tensor from the file, the
    table from the model's init (strict still refuses any other missing parameter)."""
    from vipa_jax.weights.swin import save_swin_params

    kw = dict(embed_dim=8, depths=(1, 1), num_heads=(1, 1), window_size=4)
    plain, ape = SwinTransformer(**kw), SwinTransformer(**kw, ape=True)
    x = jnp.zeros((1, 32, 32, 3))
    params = plain.init(jax.random.PRNGKey(0), x)["params"]
    path = save_swin_params(params, tmp_path / "plain.safetensors")
    init = ape.init(jax.random.PRNGKey(3), x)["params"]
    loaded, report = load_swin_params(path, ape, rng=jax.random.PRNGKey(3))
    assert report.missing == ["absolute_pos_embed/table"]
    # the same init (rng 3) jitted by the loader and run eagerly here: equal to rounding
    np.testing.assert_allclose(loaded["absolute_pos_embed"]["table"],
                               init["absolute_pos_embed"]["table"], rtol=1e-6, atol=0)
    assert float(jnp.abs(loaded["absolute_pos_embed"]["table"]).max()) > 0
    np.testing.assert_array_equal(loaded["patch_embed"]["proj"]["kernel"],
                                  params["patch_embed"]["proj"]["kernel"])
    # The subtree form used by train.init_swin keeps the given table.
    sub, _ = load_swin_params(path, None, init)
    np.testing.assert_array_equal(sub["absolute_pos_embed"]["table"],
                                  init["absolute_pos_embed"]["table"])
    no_block = {k: v for k, v in params.items() if k != "layers_1"}
    path2 = save_swin_params(no_block, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        load_swin_params(path2, ape)


def test_ape_table_of_another_grid_loads(tmp_path: Any) -> None:
    """An ape table saved on a 16×16 grid loads into a model (kept: resized at apply time) and
    into given params of an 8×8 grid (resized, corners kept, as train.init_swin does)."""
    from vipa_jax.weights.swin import save_swin_params

    model = SwinTransformer(embed_dim=8, depths=(1, 1), num_heads=(1, 1), window_size=4, ape=True)
    big = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
    path = save_swin_params(big, tmp_path / "ape64.safetensors")
    loaded, _ = load_swin_params(path, model)
    np.testing.assert_array_equal(loaded["absolute_pos_embed"]["table"],
                                  big["absolute_pos_embed"]["table"])
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 64, 64, 3))
    np.testing.assert_allclose(model.apply({"params": loaded}, x)[-1],
                               model.apply({"params": big}, x)[-1], atol=1e-6)
    small = model.init(jax.random.PRNGKey(2), jnp.zeros((1, 32, 32, 3)))["params"]
    sub, _ = load_swin_params(path, None, small)
    table, src = sub["absolute_pos_embed"]["table"], big["absolute_pos_embed"]["table"]
    assert table.shape == (1, 8, 8, 8)
    np.testing.assert_allclose(table[0, 0, 0], src[0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(table[0, -1, -1], src[0, -1, -1], atol=1e-6)
    wide = SwinTransformer(embed_dim=16, depths=(1, 1), num_heads=(1, 1), window_size=4,
                           ape=True)
    with pytest.raises(ValueError, match="absolute_pos_embed/table: expected shape"):
        load_swin_params(path, wide)


def test_relative_position_bias_inference_cache() -> None:
    """`vipa.with_inference_cache` on a Swin stores each block's gathered relative-position
    bias (heads, T, T) on a CPU, never at init; the uncached features come out of it and the
    cache is what runs; a cache of another window is an error naming the block; a GPU's model
    caches none."""
    from vipa_jax.backend import compiling_for
    from vipa_jax.models.swin import RELATIVE_POSITION_BIAS
    from vipa_jax.models.vipa import with_inference_cache

    images = jnp.asarray(_images(1, 64, 64))
    model = SwinTransformer(**SMALL, window_size=4)
    variables = model.init(jax.random.key(0), images)
    assert set(variables) == {"params"}
    cached = with_inference_cache(model, variables, images)
    cache = cached[RELATIVE_POSITION_BIAS]
    assert sorted(cache) == [f"layers_{i}" for i in range(4)]
    for i, heads in enumerate(SMALL["num_heads"]):
        for j in range(2):
            table = variables["params"][f"layers_{i}"][f"blocks_{j}"][
                "relative_position_bias_table"]
            want = np.transpose(np.asarray(table)[relative_position_index(4)], (2, 0, 1))
            got = np.asarray(cache[f"layers_{i}"][f"blocks_{j}"]["bias"])
            assert got.shape == (heads, 16, 16)
            np.testing.assert_array_equal(got, want)
    fwd = jax.jit(model.apply)
    for a, b in zip(fwd(cached, images), fwd(variables, images), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    other = {**cached, RELATIVE_POSITION_BIAS: jax.tree.map(lambda b: -3 * b, cache)}
    diff = [float(jnp.abs(a - b).max())
            for a, b in zip(fwd(other, images), fwd(cached, images), strict=True)]
    assert max(diff) > 1e-3, diff
    stale = {**cached, RELATIVE_POSITION_BIAS: jax.tree.map(lambda b: b[:, :9, :9], cache)}
    with pytest.raises(ValueError, match=r"layers_0/blocks_0: cached relative_position_bias"):
        model.apply(stale, images)
    with compiling_for("gpu"):
        assert RELATIVE_POSITION_BIAS not in with_inference_cache(model, variables, images)
