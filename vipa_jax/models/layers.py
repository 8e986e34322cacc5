"""Shared building blocks.

One masked multi-head attention (`MultiHeadAttention`, built on `dot_product_attention`)
serves every MHSA/MHCA in the project: BERT self-attention, Swin window attention (with
relative-position bias and shift mask), the fusion encoder's cross-attention, the VEG's
masked cross-attention and word self-attention, and the decoder's cross-attention.

Conventions
- Token tensors are channels-last: (..., L, C). Any number of leading batch dims is allowed
  (Swin passes (B, nW, T, C)).
- Masks are boolean, True = "may attend", broadcastable to (..., H, Lq, Lk).
- Biases are additive, broadcastable to (..., H, Lq, Lk).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

# Matches HF's additive mask (finfo.min) closely enough for parity, without overflowing when
# a bias is added to it.
_MASK_VALUE = -1e9


def exact_gelu(x: Array) -> Array:
    """GELU with the exact erf form (BERT, Swin and PyTorch's nn.GELU default)."""
    return nn.gelu(x, approximate=False)


def padding_mask_to_attention_mask(key_mask: Array) -> Array:
    """(B, Lk) {0,1} padding mask -> (B, 1, 1, Lk) boolean attention mask."""
    return key_mask.astype(bool)[:, None, None, :]


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    bias: Array | None = None,
    mask: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    deterministic: bool = True,
    dtype: Dtype | None = None,
) -> Array:
    """softmax(q kᵀ / √d + bias, masked) v.

    q: (..., Lq, H, D), k/v: (..., Lk, H, D) -> (..., Lq, H, D). Softmax runs in float32.
    A query row whose keys are all masked gets uniform weights (as HF's additive mask does).
    """
    dtype = dtype or q.dtype
    depth = q.shape[-1]
    q = q / jnp.sqrt(jnp.asarray(depth, dtype=q.dtype))
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k).astype(jnp.float32)  # (..., H, Lq, Lk)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, _MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    if not deterministic and dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("dropout_rng is required when dropout is active")
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0).astype(dtype)
    return jnp.einsum("...hqk,...khd->...qhd", weights, v.astype(dtype))


class MultiHeadAttention(nn.Module):
    """Multi-head attention with masks and additive bias: MHSA when `inputs_kv` is None, else MHCA.

    Parameter names `query`/`key`/`value` mirror HF BERT and HF Swin; the optional output
    projection is `out` (BERT and Swin keep theirs in a separate `output` module, so they set
    `use_output_proj=False`).
    """

    num_heads: int
    qkv_features: int | None = None  # default: the query's channel count
    out_features: int | None = None  # default: the query's channel count
    use_output_proj: bool = True
    use_bias: bool = True
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,  # (..., Lq, Cq)
        inputs_kv: Array | None = None,  # (..., Lk, Ck)
        *,
        mask: Array | None = None,  # bool, broadcastable to (..., H, Lq, Lk)
        bias: Array | None = None,  # broadcastable to (..., H, Lq, Lk)
        deterministic: bool = True,
    ) -> Array:
        if inputs_kv is None:
            inputs_kv = inputs_q
        features = self.qkv_features or inputs_q.shape[-1]
        if features % self.num_heads:
            raise ValueError(f"qkv_features {features} not divisible by num_heads {self.num_heads}")
        head_dim = features // self.num_heads
        dense = functools.partial(
            nn.Dense,
            features,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
        )

        def split(x: Array) -> Array:
            return x.reshape(*x.shape[:-1], self.num_heads, head_dim)

        q = split(dense(name="query")(inputs_q))
        k = split(dense(name="key")(inputs_kv))
        v = split(dense(name="value")(inputs_kv))
        dropout_rng = None
        if not deterministic and self.dropout_rate > 0.0:
            dropout_rng = self.make_rng("dropout")
        out = dot_product_attention(
            q,
            k,
            v,
            bias=bias,
            mask=mask,
            dropout_rate=self.dropout_rate,
            dropout_rng=dropout_rng,
            deterministic=deterministic,
            dtype=self.dtype,
        )
        out = out.reshape(*out.shape[:-2], features)
        if self.use_output_proj:
            out = nn.Dense(
                self.out_features or inputs_q.shape[-1],
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=self.kernel_init,
                bias_init=self.bias_init,
                name="out",
            )(out)
        return out


class Mlp(nn.Module):
    """Two-layer feed-forward block: Dense -> GELU (exact) -> dropout -> Dense -> dropout."""

    hidden_features: int
    out_features: int | None = None
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    names: tuple[str, str] = ("fc1", "fc2")

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        out = self.out_features or x.shape[-1]
        dense = functools.partial(
            nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init
        )
        x = exact_gelu(dense(self.hidden_features, name=self.names[0])(x))
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        x = dense(out, name=self.names[1])(x)
        return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample (rng stream 'dropout')."""

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


def _interp_matrix(in_size: int, out_size: int, align_corners: bool) -> Array:
    """(out_size, in_size) linear-interpolation weights, PyTorch `F.interpolate` semantics."""
    out_idx = jnp.arange(out_size, dtype=jnp.float32)
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = out_idx * scale
    else:
        src = jnp.clip((out_idx + 0.5) * (in_size / out_size) - 0.5, 0.0, None)
    lo = jnp.clip(jnp.floor(src), 0, in_size - 1).astype(jnp.int32)
    hi = jnp.clip(lo + 1, 0, in_size - 1)
    frac = src - lo.astype(jnp.float32)
    eye = jnp.eye(in_size, dtype=jnp.float32)
    return eye[lo] * (1.0 - frac)[:, None] + eye[hi] * frac[:, None]


def resize_bilinear(x: Array, size: tuple[int, int], *, align_corners: bool = True) -> Array:
    """Bilinear resize of (B, H, W, C) or (B, H, W) maps, as PyTorch's F.interpolate(bilinear).

    LAVT/CrossVLT upsample with align_corners=True everywhere (jax.image.resize is half-pixel,
    i.e. align_corners=False); written as two small matmuls so it is exact and fast.
    """
    squeeze = x.ndim == 3
    if squeeze:
        x = x[..., None]
    h, w = x.shape[1:3]
    if (h, w) != tuple(size):
        rows = _interp_matrix(h, size[0], align_corners).astype(x.dtype)  # (H', H)
        cols = _interp_matrix(w, size[1], align_corners).astype(x.dtype)  # (W', W)
        x = jnp.einsum("ph,bhwc->bpwc", rows, x)
        x = jnp.einsum("qw,bpwc->bpqc", cols, x)
    return x[..., 0] if squeeze else x


class AttentionBlock(nn.Module):
    """x ← LayerNorm(x + MHA(x, kv, mask)): the residual MHSA/MHCA unit of the VEG and decoder."""

    num_heads: int
    qkv_features: int | None = None
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Array,  # (B, Lq, C)
        kv: Array | None = None,  # (B, Lk, Ck); None = self-attention
        *,
        mask: Array | None = None,  # bool, broadcastable to (B, H, Lq, Lk)
        deterministic: bool = True,
    ) -> Array:
        y = MultiHeadAttention(
            num_heads=self.num_heads,
            qkv_features=self.qkv_features,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            name="attn",
        )(x, kv, mask=mask, deterministic=deterministic)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x + y)


class FeedForwardBlock(nn.Module):
    """x ← LayerNorm(x + MLP(x)): the residual MLP unit of the VEG and decoder."""

    mlp_ratio: float = 4.0
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        y = Mlp(
            hidden_features=int(x.shape[-1] * self.mlp_ratio),
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            name="mlp",
        )(x, deterministic=deterministic)
        return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x + y)
