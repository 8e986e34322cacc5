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
import numpy as np

from vipa_jax.backend import target_backend
from vipa_jax.models.layers import (
    AttentionBlock,
    FeedForwardBlock,
    LayerNorm,
    asks_float32_results,
    einsum,
    inference_cached,
    maybe_remat,
    resize_bilinear_align_corners,
)

Array = jax.Array
NORMS = ("batch", "group", "layer")
CONV_IMPLS = ("auto", "xla", "taps", "winograd", "winograd2", "winograd4", "winograd6")
# The variable collection that holds inference's transformed Winograd kernels (`WinogradConv`,
# `vipa.with_inference_cache`).
WINOGRAD_CACHE = "winograd"

# Winograd F(m×m, 3×3) transforms (Lavin & Gray, CVPR 2016): Bᵀ (input), G (kernel), Aᵀ (output).
# F(6×6) interpolates at 0, ±1, ±2, ±1/2 and ∞ (the points of Lavin's wincnn and of NNPACK).
WINOGRAD: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
        np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]])),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                  [0, 1, -1, 8, -8, 1]])),
    6: (np.array([[1, 0, -21 / 4, 0, 21 / 4, 0, -1, 0],
                  [0, 1, 1, -17 / 4, -17 / 4, 1, 1, 0],
                  [0, -1, 1, 17 / 4, -17 / 4, -1, 1, 0],
                  [0, 1 / 2, 1 / 4, -5 / 2, -5 / 4, 2, 1, 0],
                  [0, -1 / 2, 1 / 4, 5 / 2, -5 / 4, -2, 1, 0],
                  [0, 2, 4, -5 / 2, -5, 1 / 2, 1, 0],
                  [0, -2, 4, 5 / 2, -5, -1 / 2, 1, 0],
                  [0, -1, 0, 21 / 4, 0, -21 / 4, 0, 1]]),
        np.array([[1, 0, 0], [-2 / 9, -2 / 9, -2 / 9], [-2 / 9, 2 / 9, -2 / 9],
                  [1 / 90, 1 / 45, 2 / 45], [1 / 90, -1 / 45, 2 / 45],
                  [32 / 45, 16 / 45, 8 / 45], [32 / 45, -16 / 45, 8 / 45], [0, 0, 1]]),
        np.array([[1, 1, 1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 1 / 2, -1 / 2, 0],
                  [0, 1, 1, 4, 4, 1 / 4, 1 / 4, 0], [0, 1, -1, 8, -8, 1 / 8, -1 / 8, 0],
                  [0, 1, 1, 16, 16, 1 / 16, 1 / 16, 0],
                  [0, 1, -1, 32, -32, 1 / 32, -1 / 32, 1]])),
}


def _tile_taps(x: Array, axis: int, tile: int, tiles: int) -> list[Array]:
    """The tile+2 input taps of every tile along `axis` (tiles start every `tile` entries)."""
    return [jax.lax.slice_in_dim(x, k, k + tile * (tiles - 1) + 1, tile, axis)
            for k in range(tile + 2)]


def _transform_2d(matrix: np.ndarray, x: Array) -> Array:
    """Y = M X Mᵀ on every (p, p) tile of x (p², ...), tile axis flattened row-major → (q², ...),
    as one GEMM with kron(M, M) (q², p²): (M X Mᵀ)[s, t] = Σ_ij M[s, i] M[t, j] X[i, j]."""
    kron = jnp.asarray(np.kron(matrix, matrix), x.dtype)
    return einsum("st,t...->s...", kron, x)


def _winograd_matrices(tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Bᵀ, G, Aᵀ) of F(m×m, 3×3), m = `tile`; an unknown tile is an error."""
    if tile not in WINOGRAD:
        raise ValueError(f"Winograd tile must be one of {sorted(WINOGRAD)}, got {tile}")
    return WINOGRAD[tile]


def winograd_kernel(kernel: Array, tile: int) -> Array:
    """U = G g Gᵀ (Lavin & Gray, eq. 8) for every (input, output) channel pair:
    kernel (3, 3, C, F) HWIO → ((m+2)², C, F), m = `tile`."""
    return _transform_2d(_winograd_matrices(tile)[1], kernel.reshape(9, kernel.shape[2], -1))


def winograd_conv3x3(x: Array, kernel: Array, tile: int = 2) -> Array:
    """3×3 stride-1 'SAME' convolution by Winograd F(m×m, 3×3), m = `tile` ∈ {2, 4, 6} (Lavin &
    Gray, CVPR 2016).

    x (B, H, W, C), kernel (3, 3, C, F) HWIO → (B, H, W, F), the same function as
    `lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)))` up to float rounding
    (float32, relative to the largest output: ~2e-6 for m = 2, 1–3e-5 for m = 4, 2–4e-5 for
    m = 6). Every m×m output tile is Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A: (m+2)² (tiles, C) × (C, F) GEMMs
    instead of 9m² per tile, i.e. 2.25× (m = 2), 4× (m = 4) or 5.06× (m = 6) fewer
    multiply-adds. The three tile transforms are GEMMs with Kronecker-product matrices
    (`_transform_2d`), which XLA:CPU runs faster than the same transforms written as additions of
    strided slices (benchmarks/README.md). H/W that are not multiples of m
    are padded to whole tiles and cropped. Differentiable (everything is linear), so it trains.
    """
    return winograd_conv3x3_u(x, winograd_kernel(kernel, tile), tile)


def winograd_conv3x3_u(x: Array, u: Array, tile: int) -> Array:
    """`winograd_conv3x3` from the transformed kernel u = `winograd_kernel(kernel, tile)`
    ((m+2)², C, F): Aᵀ[U ⊙ (Bᵀ d B)]A per tile (Lavin & Gray, eq. 8), x (B, H, W, C) → (B, H, W, F).
    """
    bt, _, at = _winograd_matrices(tile)
    b, h, w, c = x.shape
    n = (tile + 2) ** 2  # input tile size, (m+2)²
    if u.shape[:2] != (n, c):
        raise ValueError(f"transformed kernel of shape {u.shape} does not fit F({tile}×{tile}, "
                         f"3×3) on {c} input channels: expected ({n}, {c}, F)")
    th, tw = -(-h // tile), -(-w // tile)  # output tiles per axis
    xp = jnp.pad(x, ((0, 0), (1, 1 + tile * th - h), (1, 1 + tile * tw - w), (0, 0)))
    # The input tiles, tap by tap: (m+2, m+2, B, th, tw, C). Stacked row by row, XLA:CPU makes
    # one fusion of it; one flat stack of the n taps became n slice copies and a stack (+30%).
    d = jnp.stack([jnp.stack(_tile_taps(row, 2, tile, tw)) for row in _tile_taps(xp, 1, tile, th)])
    v = _transform_2d(bt, d.reshape(n, b * th * tw, c))  # Bᵀ d B: (n, tiles, C)
    prod = einsum("tnc,tcf->tnf", v, u)  # n GEMMs
    y = _transform_2d(at, prod)  # Aᵀ[·]A: (m², tiles, F)
    y = y.reshape(tile, tile, b, th, tw, -1).transpose(2, 3, 0, 4, 1, 5)  # (B, th, m, tw, m, F)
    return y.reshape(b, tile * th, tile * tw, -1)[:, :h, :w]


def resolve_conv_impl(conv_impl: str, dtype: Any = jnp.float32) -> str:
    """'auto' → on a CPU backend 'winograd' for float32 compute (the paper config's CPU forward
    −18 to −23%, benchmarks/README.md) and 'taps' for lower precision (F(4×4)'s transforms lose
    too much in bfloat16; XLA:CPU computes a bf16 convolution in float32); 'xla' elsewhere
    (cuDNN on GPU); any other `conv_impl` as given."""
    if conv_impl != "auto":
        return conv_impl
    if target_backend() != "cpu":
        return "xla"
    return "winograd" if jnp.dtype(dtype) == jnp.float32 else "taps"


def conv3x3_taps(x: Array, kernel: Array) -> Array:
    """`lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)))` (NHWC, HWIO) as nine
    GEMMs, one per kernel tap, summed in float32 (with float32 results where
    `layers.asks_float32_results`). The zero-padded map is flattened to rows of width W + 2,
    so each tap's input is one contiguous slice of it, shifted by dy·(W + 2) + dx; the two
    extra columns of every output row are dropped at the end. XLA:CPU runs a bf16 convolution
    by converting it to float32, while these bf16 × bf16 → f32 GEMMs run in its GEMM library
    (AMX where the CPU has it): on a 2-core AMX host, 120×120, 640 → 512, 175 against 315 ms
    (benchmarks/README.md). x (B, H, W, C), kernel (3, 3, C, F) -> (B, H, W, F) in x's dtype."""
    b, h, w, c = x.shape
    wp = w + 2
    flat = jnp.pad(x, ((0, 0), (1, 2), (1, 1), (0, 0))).reshape(b, (h + 3) * wp, c)
    n = h * wp
    kernel = kernel.astype(x.dtype)
    dims = (((2,), (0,)), ((), ()))
    tap_in = jax.ShapeDtypeStruct((b, n, c), flat.dtype)
    wide = jnp.float32 if asks_float32_results(tap_in, kernel[0, 0], dims) else None
    acc = None
    for dy in range(3):
        for dx in range(3):
            off = dy * wp + dx
            tap = jax.lax.dot_general(flat[:, off:off + n], kernel[dy, dx], dims,
                                      preferred_element_type=wide)  # (B, H·(W+2), F)
            tap = tap.astype(jnp.promote_types(tap.dtype, jnp.float32))
            acc = tap if acc is None else acc + tap
    return acc.reshape(b, h, wp, -1)[:, :, :w].astype(x.dtype)


def _winograd_macs(tile: int, height: int, width: int) -> float:
    """Multiply-adds of F(m×m, 3×3)'s GEMMs per channel pair on a (height, width) map, its
    padding to whole tiles included: (m+2)² per m×m output tile."""
    return -(-height // tile) * -(-width // tile) * (tile + 2) ** 2


def winograd_tile(conv_impl: str, height: int, width: int,
                  dtype: Any = jnp.float32, cached: bool = False) -> int | None:
    """The Winograd tile a `conv_impl` uses on a (height, width) map in `dtype`; None = XLA's
    convolution. `cached`: the transformed kernel comes precomputed (inference with
    `vipa.with_inference_cache`), so only the input and output transforms cost time.

    'auto': see `resolve_conv_impl`. 'winograd' picks by map size, from single-convolution
    timings on a 2-core AVX-512 VM (benchmarks/README.md), by the shorter side s:
    - s < 48 (< 24 with `cached`): XLA's convolution. Without the cache, F(4×4) there costs more
      in its kernel transform than it saves (30×30, 1536→512: 84 ms against 68 for XLA's conv;
      32 ms with U cached).
    - cached, s ≥ 24: F(6×6) or F(4×4), whichever does fewer GEMM multiply-adds counting the
      padding to whole tiles (F(4×4) on ties: less rounding). The paper config's 120, 60 and
      30 px maps divide by 6: F(6×6) is 16, 8 and 15% faster there than F(4×4) (120×120,
      640→512: 161 against 192 ms).
    - not cached: F(6×6) by the same count from s ≥ 96, F(4×4) below. Its kernel transform is
      1.8× F(4×4)'s, so it only pays on the large maps: 120×120, 640→512, forward + backward
      537 against 595 ms; 60×60, 768→512, 231 against 207 ms.
    'winograd2' / 'winograd4' / 'winograd6' use one tile everywhere.
    """
    conv_impl = resolve_conv_impl(conv_impl, dtype)
    if conv_impl in ("xla", "taps"):
        return None
    if conv_impl == "winograd":
        side = min(height, width)
        if side < (24 if cached else 48):
            return None
        if not cached and side < 96:
            return 4
        return min((4, 6), key=lambda t: (_winograd_macs(t, height, width), t))
    if conv_impl in ("winograd2", "winograd4", "winograd6"):
        return int(conv_impl[-1])
    raise ValueError(f"decoder.conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")


class TapsConv(nn.Module):
    """`nn.Conv(features, (3, 3), padding=1, use_bias=False)` computed by `conv3x3_taps`, with
    the same parameter (`kernel`, (3, 3, C, F), lecun-normal init)."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (3, 3, x.shape[-1], self.features), self.param_dtype)
        return conv3x3_taps(x.astype(self.dtype), kernel)  # (kernel cast to x's dtype there)


class WinogradConv(nn.Module):
    """`nn.Conv(features, (3, 3), padding=1, use_bias=False)` computed by `winograd_conv3x3`:
    the same parameter (`kernel`, (3, 3, C, F), lecun-normal init), so checkpoints load either
    way.

    With `cached` (inference), the transformed kernel U = G g Gᵀ may be precomputed once
    (`vipa.with_inference_cache`): it is then read from the `WINOGRAD_CACHE` collection
    ('winograd', variable 'u') instead of being recomputed from `kernel` on every call; applying
    with that collection mutable (outside `init`) stores it. The cache is not tied to `kernel`:
    rebuild it whenever the params change. Without `cached` (training) U always comes from
    `kernel`, whatever the variables hold, so gradients reach it.
    """

    features: int
    tile: int = 2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    cached: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (3, 3, x.shape[-1], self.features), self.param_dtype)
        u = self.transformed_kernel(kernel)
        return winograd_conv3x3_u(x.astype(self.dtype), u.astype(self.dtype), self.tile)

    def transformed_kernel(self, kernel: Array) -> Array:
        """U ((m+2)², C, F): the cached one if present, else computed (and stored when the cache
        collection is mutable)."""
        if not self.cached:
            return winograd_kernel(kernel, self.tile)
        shape = ((self.tile + 2) ** 2, *kernel.shape[2:])
        return inference_cached(self, WINOGRAD_CACHE, "u", shape,
                                lambda: winograd_kernel(kernel, self.tile),
                                what=f" for F({self.tile}×{self.tile}) on this conv")


class ConvNormReLU(nn.Module):
    """3×3 conv (no bias) → norm → ReLU, LAVT's decoder unit (BatchNorm = SyncBN under jit).

    `conv_impl`: 'auto' (`resolve_conv_impl`: on CPU 'winograd' for float32 and 'taps' for
    bfloat16, else 'xla'), 'xla' (XLA's convolution; cuDNN on GPU), 'taps' (`conv3x3_taps`:
    nine GEMMs) or 'winograd' / 'winograd2' / 'winograd4' /
    'winograd6' (`winograd_conv3x3` with the tile `winograd_tile` picks; the same parameters,
    2.25×, 4× or 5.06× fewer multiply-adds: faster on CPU for the large maps).
    """

    features: int
    norm: str = "batch"
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:  # (B, H, W, C) → (B, H, W, F)
        # Inference whose transformed Winograd kernels are (or are being) cached.
        cached = not train and not self.is_initializing() and (
            self.is_mutable_collection(WINOGRAD_CACHE)
            or self.has_variable(WINOGRAD_CACHE, "Conv_0"))
        impl = resolve_conv_impl(self.conv_impl, self.dtype)
        tile = winograd_tile(impl, x.shape[1], x.shape[2], self.dtype, cached)
        if impl == "taps":
            x = TapsConv(self.features, dtype=self.dtype, name="Conv_0")(x)
        elif tile is None:
            x = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(x)
        else:
            x = WinogradConv(self.features, tile, dtype=self.dtype, cached=cached,
                             name="Conv_0")(x)
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
    remat: bool | str = False  # recompute each stage / conv block in the backward (a policy)
    dtype: Any = jnp.float32
    conv_impl: str = "auto"  # 3×3 convs: auto | xla | winograd | winograd2|4|6

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
                x = conv_cls(self.hidden_dim, self.norm, self.dtype, self.conv_impl,
                             name=f"up{i + 1}_{j}")(x, train)
        logits = nn.Conv(1, (1, 1), dtype=self.dtype, name="head")(x)[..., 0]  # (B, H1, W1)
        return logits.astype(jnp.float32)
