"""VIPA: early-fusion encoder → advanced language tokens → VEG → decoder (DESIGN §model).

    F_v^{1..4}, E_L = FusionEncoder(image, sentence)
    Ê_L = MLP(MHCA(E_L, F_v^4) + E_L)            # advanced language tokens
    Ê_V = VEG(F_v^4, Ê_L)                         # visual expressive tokens (B, L, D)
    logits = Decoder(F_v^{1..4}, K/V = Ê_V)       # (B, H/4, W/4) → bilinear to (B, H, W)

`model.veg.kv` picks the decoder's keys/values: 'vision' (Ê_V), 'vanilla_lang' (E_L) or
'advanced_lang' (Ê_L) — the paper's Table V.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vipa_jax.models.bert import BertConfig
from vipa_jax.models.decoder import WINOGRAD_CACHE, Decoder
from vipa_jax.models.fusion import FusionEncoder
from vipa_jax.models.layers import (
    TRANSPOSED_KERNELS,
    AttentionBlock,
    FeedForwardBlock,
    dot_results,
    remat_policy,
    resize_bilinear_align_corners,
)
from vipa_jax.models.swin import RELATIVE_POSITION_BIAS
from vipa_jax.models.veg import build_veg

Array = jax.Array
KV_SOURCES = ("vision", "vanilla_lang", "advanced_lang")


class AdvancedLanguageTokens(nn.Module):
    """Ê_L = FFN(MHCA(E_L, F_v) + E_L): language queries over the final vision tokens."""

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, lang: Array, vis: Array, *, train: bool) -> Array:
        # lang (B, L, C_l), vis (B, N, C_v) -> (B, L, C_l)
        x = AttentionBlock(self.num_heads, dtype=self.dtype, name="cross_attn")(
            lang, vis, deterministic=not train
        )
        return FeedForwardBlock(dtype=self.dtype, name="ffn")(x, deterministic=not train)


class VIPA(nn.Module):
    """The full model; `config` is the `model` section of a VIPA config (frozen)."""

    config: ml_collections.FrozenConfigDict

    def setup(self) -> None:
        cfg = self.config
        if cfg.veg.kv not in KV_SOURCES:
            raise ValueError(f"model.veg.kv must be one of {KV_SOURCES}, got {cfg.veg.kv!r}")
        dtype = jnp.dtype(cfg.dtype)
        # False, or the policy of every rematerialized block (checked here, at build time)
        remat = cfg.remat and cfg.get("remat_policy", "full")
        if remat:
            remat_policy(remat)
        bert = BertConfig.from_dict(cfg.bert)
        self.encoder = FusionEncoder(
            swin=dict(cfg.swin),
            bert=bert,
            fusion=cfg.fusion,
            fusion_op=cfg.fusion_op,
            stage_layers=tuple(cfg.lang_stage_layers),
            fusion_head_dim=cfg.fusion_head_dim,
            fusion_min_dim=cfg.fusion_min_dim,
            remat=remat,
            dtype=dtype,
        )
        self.advanced_lang = AdvancedLanguageTokens(bert.num_attention_heads, dtype=dtype)
        self.veg = build_veg(cfg.veg, dtype=dtype)
        d = cfg.decoder
        self.decoder = Decoder(
            hidden_dim=d.hidden_dim, head_dim=d.head_dim, mlp_ratio=d.mlp_ratio, norm=d.norm,
            dropout_rate=d.dropout, remat=remat, dtype=dtype, conv_impl=d.conv_impl,
        )

    def __call__(
        self,
        images: Array,  # (B, H, W, 3) ImageNet-normalized
        input_ids: Array,  # (B, L) int32
        token_mask: Array,  # (B, L) {0,1}
        *,
        train: bool = False,
    ) -> dict[str, Array]:
        # the matmuls' result type (`layers.dot_results`); a `with` block, not a method, so that
        # the modules' names (profiles, HLO metadata) stay those of `__call__`
        with dot_results(self.config.get("dot_results", "auto")):
            enc = self.encoder(images, input_ids, token_mask, train=train)
            f4 = enc.features[-1]
            b, h4, w4, c4 = f4.shape
            vis = f4.reshape(b, h4 * w4, c4)  # (B, N, C_4)
            lang_adv = self.advanced_lang(enc.lang, vis, train=train)  # Ê_L (B, L, C_l)
            veg = self.veg(vis, lang_adv, token_mask, train=train)
            kv_source = self.config.veg.kv
            if kv_source == "vision":
                kv, kv_mask = veg["tokens"], veg["token_mask"]
            else:
                kv = enc.lang if kv_source == "vanilla_lang" else lang_adv
                kv_mask = token_mask.astype(bool)
            low = self.decoder(enc.features, kv, kv_mask, train=train)  # (B, H/4, W/4)
            logits = resize_bilinear_align_corners(low, images.shape[1:3])
            return {
                "logits": logits,  # (B, H, W) mask logits
                "cls_relevance": veg["cls_relevance"].reshape(b, h4, w4),  # contrastive-loss logits
                "tau": veg["tau"],
                "relevance": veg["similarity"].reshape(b, -1, h4, w4),  # S_c per token (heatmaps)
                "selection": veg["mask"].reshape(b, -1, h4, w4),  # M per token
            }


def build_model(model_config: ml_collections.ConfigDict | ml_collections.FrozenConfigDict) -> VIPA:
    """VIPA from the `model` config section."""
    return VIPA(ml_collections.FrozenConfigDict(model_config))


def init_variables(model: VIPA, rng: Array, image_size: int, max_tokens: int) -> Any:
    """Random variables (params, batch_stats) for a model at the given input size."""
    k1, k2, k3 = jax.random.split(rng, 3)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    ids = jnp.zeros((1, max_tokens), jnp.int32)
    mask = jnp.ones((1, max_tokens), jnp.int32)
    return model.init({"params": k1, "gumbel": k2, "dropout": k3}, images, ids, mask, train=False)


# What inference precomputes from the params (`with_inference_cache`): each collection's
# module stores its value when the collection is mutable and reads it when present.
INFERENCE_CACHES = (WINOGRAD_CACHE, TRANSPOSED_KERNELS, RELATIVE_POSITION_BIAS)
TRANSPOSED_KERNEL_SETTINGS = ("auto", "off")  # model.transposed_kernels


def with_inference_cache(model: nn.Module, variables: Any, *inputs: Any, **kwargs: Any) -> Any:
    """`variables` + what inference can precompute from the params once instead of per call:
    - 'winograd': the transformed kernel U = G g Gᵀ of every Winograd decoder conv (which may
      then use Winograd on smaller maps, `decoder.winograd_tile`);
    - 'transposed_kernels': the (F, C) kernel of every `layers.Dense` that
      `layers.prefers_transposed_kernel` picks for its input rows (on a CPU: BERT's and the
      other language-side projections, whose rows are words), unless the VIPA config's
      `transposed_kernels` is 'off';
    - 'relative_position_bias': each Swin block's gathered bias (on a CPU).
    For inference only: the caches are not tied to the params, so rebuild them whenever those
    change, and never differentiate through them.

    `model(*inputs, **kwargs)` is the inference call (`VIPA`: images, input_ids,
    attention_mask; `train=False` is added; a part such as `BertModel` works the same way). The
    inputs (arrays or `jax.ShapeDtypeStruct`s) give the map sizes and row counts that pick
    the layers; the cached values do not depend on them, and at another input size a layer
    without a cached value computes from its params. The modules store the values during one
    jitted call whose only outputs are the caches, so XLA drops the rest of the forward. A
    model with nothing to cache (a GPU backend) gets `variables` back without the collections.
    Stale cache collections in `variables` are replaced. Abstract variables
    (`jax.ShapeDtypeStruct` leaves, for ahead-of-time compiles) get an abstract cache.
    """
    base = {k: v for k, v in variables.items() if k not in INFERENCE_CACHES}
    caches = list(INFERENCE_CACHES)
    if isinstance(model, VIPA):
        kwargs.setdefault("train", False)
        setting = model.config.get("transposed_kernels", "auto")
        if setting not in TRANSPOSED_KERNEL_SETTINGS:
            raise ValueError(f"model.transposed_kernels must be one of "
                             f"{TRANSPOSED_KERNEL_SETTINGS}, got {setting!r}")
        if setting == "off":
            caches.remove(TRANSPOSED_KERNELS)

    def build(v: Any, *args: Any) -> dict[str, Any]:
        stored = model.apply(v, *args, **kwargs, mutable=caches)[1]
        return {name: stored[name] for name in caches if stored.get(name)}

    traced = jax.jit(build).trace(base, *inputs)  # one trace gives the shapes and the program
    if not traced.out_info:
        return base
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(base)):
        return {**base, **traced.out_info}
    dummies = [np.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x
               for x in inputs]  # (only their shapes matter: the forward itself is dropped)
    return {**base, **traced.lower().compile()(base, *dummies)}
