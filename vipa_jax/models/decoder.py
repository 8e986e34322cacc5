"""VIPA decoder: per-stage cross-attention to the visual expressive tokens, then LAVT upsampling.

For each encoder stage i (4 → 1):
    F_o = MHCA(F_v^i, Ê_V) + F_v^i;   F_d = MLP(F_o) + F_o          (each followed by LayerNorm)
then LAVT's SimpleDecoding: upsample ×2 (bilinear, align_corners=True), concat with the next
stage's F_d, 3×3 conv-norm-ReLU ×2; a final 1×1 conv gives one mask logit per pixel at 1/4 of
the input resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vipa_jax.models.layers import (
    AttentionBlock,
    FeedForwardBlock,
    LayerNorm,
    maybe_remat,
    resize_bilinear_align_corners,
)

Array = jax.Array
NORMS = ("batch", "group", "layer")


class ConvNormReLU(nn.Module):
    """3×3 conv (no bias) → norm → ReLU, LAVT's decoder unit (BatchNorm = SyncBN under jit)."""

    features: int
    norm: str = "batch"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:  # (B, H, W, C) → (B, H, W, F)
        x = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(x)
        if self.norm == "batch":
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=self.dtype)(x)
        elif self.norm == "group":
            x = nn.GroupNorm(num_groups=min(32, self.features), epsilon=1e-5, dtype=self.dtype)(x)
        elif self.norm == "layer":
            x = LayerNorm(epsilon=1e-5, dtype=self.dtype)(x)
        else:
            raise ValueError(f"decoder.norm must be one of {NORMS}, got {self.norm!r}")
        return nn.relu(x)


class StageCrossAttention(nn.Module):
    """F_o = MHCA(F_v^i, Ê_V) + F_v^i; F_d = MLP(F_o) + F_o on one stage's feature map."""

    head_dim: int = 64
    mlp_ratio: float = 4.0
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feat: Array, kv: Array, kv_mask: Array, train: bool = False) -> Array:
        b, h, w, c = feat.shape
        heads = max(1, c // self.head_dim)
        t = feat.reshape(b, h * w, c)  # (B, HW, C)
        t = AttentionBlock(heads, dropout_rate=self.dropout_rate, dtype=self.dtype, name="attn")(
            t, kv, mask=kv_mask[:, None, None, :], deterministic=not train
        )
        t = FeedForwardBlock(self.mlp_ratio, self.dropout_rate, dtype=self.dtype, name="ffn")(
            t, deterministic=not train
        )
        return t.reshape(b, h, w, c)


class Decoder(nn.Module):
    """Stage-wise cross-attention + progressive upsampling → (B, H/4, W/4) mask logits."""

    hidden_dim: int = 512
    head_dim: int = 64
    mlp_ratio: float = 4.0
    norm: str = "batch"
    dropout_rate: float = 0.0
    remat: bool = False  # keep only each stage block's / conv block's input for the backward
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        feats: Sequence[Array],  # 4 × (B, H_i, W_i, C_i), stage 1 (finest) first
        kv: Array,  # (B, L, D) Ê_V (or language tokens in the K/V ablation)
        kv_mask: Array,  # (B, L) bool
        *,
        train: bool,
    ) -> Array:
        # static_argnums counts `self` as 0: `train` is argument 4 / 2.
        stage_cls = maybe_remat(StageCrossAttention, self.remat, static_argnums=(4,))
        conv_cls = maybe_remat(ConvNormReLU, self.remat, static_argnums=(2,))
        refined = [
            stage_cls(
                self.head_dim, self.mlp_ratio, self.dropout_rate, self.dtype, name=f"stage{i + 1}"
            )(f, kv, kv_mask, train)
            for i, f in enumerate(feats)
        ]
        x = refined[-1]
        for i in reversed(range(len(refined) - 1)):  # 3 → 1
            skip = refined[i]
            x = resize_bilinear_align_corners(x, skip.shape[1:3], axes=(1, 2))
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            for j in range(2):
                x = conv_cls(self.hidden_dim, self.norm, self.dtype, name=f"up{i + 1}_{j}")(
                    x, train
                )
        logits = nn.Conv(1, (1, 1), dtype=self.dtype, name="head")(x)[..., 0]  # (B, H1, W1)
        return logits.astype(jnp.float32)
