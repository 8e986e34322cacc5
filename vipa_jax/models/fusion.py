"""Early-fusion vision–language encoder (CrossVLT-style), with late / no fusion as ablations.

Vision stage i (Swin-B: C_i = 128, 256, 512, 1024):
    x = SwinStage_i(x)
    x_res = Fuse(x, L_i);  x = x + G(x_res) · x_res           # vision queries, language K/V
    F_v^i = LayerNorm_i(x_res)                                  # to the decoder (CrossVLT/LAVT)
    x = PatchMerging_i(x);  x = x + G'(Fuse'(x, L_i)) · (...)   # stages 1–3 only
Language (fusion='early'): L_1 = BERT embeddings + layers 0..5; for i = 2..4
    L_i = BertLayer^n(CrossAttention(L_{i-1}, K/V = x↓_{i-1}))  # x↓ = fused downsampled tokens
fusion='late' (LAVT): the whole language stack runs first and every vision stage fuses with the
final E_L; fusion='none': no cross-modal exchange (plain Swin, F_v^i = LayerNorm_i(x)).

Gates G = tanh(W₂ ReLU(W₁ x)) with W₂ zero-initialized, so fusion starts as the identity over
the pretrained Swin. (LAVT/CrossVLT zero-initialize *both* W₁ and W₂, which leaves both with zero
gradient forever — the gated path never opens there; we zero only W₂ so the gate can learn.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vipa_jax.models.bert import (
    BertAttention,
    BertConfig,
    BertIntermediate,
    BertLayer,
    BertModel,
    BertOutput,
)
from vipa_jax.models.layers import (
    Dense,
    LayerNorm,
    MultiHeadAttention,
    exact_gelu,
    maybe_remat,
)
from vipa_jax.models.swin import SwinTransformer

Array = jax.Array
FUSIONS = ("early", "late", "none")
FUSION_OPS = ("add", "mul")


class EncoderOutput(NamedTuple):
    features: list[Array]  # 4 × (B, H_i, W_i, C_i): F_v^1..F_v^4
    lang: Array  # (B, L, C_l): final language tokens E_L


class GatedFusion(nn.Module):
    """x_res = GELU(W(LN(MHCA(x, lang)) ∘ x)); returns (x + tanh-gate(x_res)·x_res, x_res).

    ∘ is `op`: 'add' (CrossVLT's FusionLayer, residual inside) or 'mul' (LAVT's PWAM: the
    attended language vector multiplies GELU(W_v x) element-wise).
    """

    dim: int  # attention inner width
    num_heads: int
    op: str = "add"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Array,  # (B, H, W, C)
        lang: Array,  # (B, L, C_l)
        lang_mask: Array,  # (B, L) {0,1}
    ) -> tuple[Array, Array]:
        b, h, w, c = x.shape
        t = x.reshape(b, h * w, c)
        attn = MultiHeadAttention(
            num_heads=self.num_heads, qkv_features=self.dim, out_features=c, dtype=self.dtype,
            name="attn",
        )(t, lang, mask=lang_mask.astype(bool)[:, None, None, :])  # (B, HW, C)
        attn = LayerNorm(epsilon=1e-5, dtype=self.dtype, name="attn_norm")(attn)
        if self.op == "add":
            mixed = attn + t
        elif self.op == "mul":
            mixed = attn * exact_gelu(Dense(c, dtype=self.dtype, name="vis_proj")(t))
        else:
            raise ValueError(f"model.fusion_op must be one of {FUSION_OPS}, got {self.op!r}")
        res = exact_gelu(Dense(c, dtype=self.dtype, name="mm_proj")(mixed))  # x_res
        gate = nn.relu(Dense(c, use_bias=False, dtype=self.dtype, name="gate_0")(res))
        gate = jnp.tanh(
            Dense(c, use_bias=False, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                  name="gate_1")(gate)
        )
        out = t + gate * res
        return out.reshape(b, h, w, c), res.reshape(b, h, w, c)


class LanguageCrossLayer(nn.Module):
    """CrossVLT BertStage head: language queries over vision tokens + BERT FFN (post-LN)."""

    config: BertConfig
    kv_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, lang: Array, vis: Array, deterministic: bool = True) -> Array:
        # lang (B, L, C_l); vis (B, N, kv_dim); every vision token is a valid key.
        # `deterministic` is positional too, so nn.remat can mark it static.
        attn = BertAttention(self.config, kv_dim=self.kv_dim, dtype=self.dtype, name="attention")(
            lang, None, vis, deterministic=deterministic
        )
        inter = BertIntermediate(self.config, dtype=self.dtype, name="intermediate")(attn)
        return BertOutput(self.config, dtype=self.dtype, name="output")(
            inter, attn, deterministic=deterministic
        )


class FusionEncoder(nn.Module):
    """Swin stages interleaved with BERT stages and gated cross-modal fusion (DESIGN §encoder)."""

    swin: Any  # dict / ConfigDict for SwinTransformer.from_config
    bert: BertConfig
    fusion: str = "early"
    fusion_op: str = "add"
    stage_layers: Sequence[int] = (6, 1, 1, 1)
    fusion_head_dim: int = 64
    fusion_min_dim: int = 256
    remat: bool | str = False  # False, True ('full') or a name of layers.REMAT_POLICIES
    dtype: Any = jnp.float32

    def setup(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"model.fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if len(self.stage_layers) != 4 or self.stage_layers[0] < 1:
            raise ValueError(
                f"model.lang_stage_layers must be 4 ints, the first ≥ 1: {self.stage_layers}"
            )
        self.backbone = SwinTransformer.from_config(self.swin, remat=self.remat, dtype=self.dtype)
        first = dataclasses.replace(self.bert, num_hidden_layers=self.stage_layers[0])
        self.text_encoder = BertModel(first, dtype=self.dtype, add_pooling_layer=False,
                                      remat=self.remat)
        dims = self.backbone.num_features  # (C, 2C, 4C, 8C)
        # remat: every fusion, cross layer and BERT layer keeps only its inputs for the backward
        # pass (static_argnums counts `self` as 0: 3 is `deterministic`).
        cross_cls = maybe_remat(LanguageCrossLayer, self.remat, static_argnums=(3,))
        layer_cls = maybe_remat(BertLayer, self.remat, static_argnums=(3,))
        if self.fusion != "none":
            self.fuse = [self._fusion(c) for c in dims]
            self.fuse_down = [self._fusion(c) for c in dims[1:]]
        if self.fusion == "early":
            self.lang_cross = [cross_cls(self.bert, kv_dim=c, dtype=self.dtype) for c in dims[1:]]
        self.lang_layers = [
            [layer_cls(self.bert, dtype=self.dtype) for _ in range(n)]
            for n in self.stage_layers[1:]
        ]

    def _fusion(self, c: int) -> GatedFusion:
        dim = max(c, self.fusion_min_dim)
        fusion_cls = maybe_remat(GatedFusion, self.remat)
        return fusion_cls(dim, max(1, dim // self.fusion_head_dim), op=self.fusion_op,
                          dtype=self.dtype)

    def _lang_stage(self, i: int, lang: Array, mask: Array, vis: Array | None, det: bool) -> Array:
        """Language stage i+2 (i = 0..2): optional cross-attention over vis, then BERT layers."""
        if vis is not None:
            b, h, w, c = vis.shape
            lang = self.lang_cross[i](lang, vis.reshape(b, h * w, c), det)
        for layer in self.lang_layers[i]:
            lang = layer(lang, mask, det)
        return lang

    def __call__(
        self,
        images: Array,  # (B, H, W, 3)
        input_ids: Array,  # (B, L)
        token_mask: Array,  # (B, L) {0,1}
        *,
        train: bool,
    ) -> EncoderOutput:
        det = not train
        lang = self.text_encoder.embed(input_ids, deterministic=det)
        lang = self.text_encoder.run_layers(lang, token_mask, 0, self.stage_layers[0],
                                            deterministic=det)  # L_1
        if self.fusion != "early":  # language never looks at vision: run the whole stack first
            for i in range(3):
                lang = self._lang_stage(i, lang, token_mask, None, det)
        x = self.backbone.embed(images)
        feats = []
        for i in range(4):
            x = self.backbone.run_stage(i, x, det)
            if self.fusion == "none":
                feats.append(self.backbone.stage_norm(i, x))
            else:
                x, res = self.fuse[i](x, lang, token_mask)
                feats.append(self.backbone.stage_norm(i, res))
            if i < 3:
                x = self.backbone.merge(i, x)
                if self.fusion != "none":
                    x, _ = self.fuse_down[i](x, lang, token_mask)
                if self.fusion == "early":
                    lang = self._lang_stage(i, lang, token_mask, x, det)  # L_{i+2}
        return EncoderOutput(features=feats, lang=lang)
