"""Swin Transformer (v1) backbone in Flax linen, numerically matching PyTorch Swin.

Behaviour follows the official segmentation backbone (Swin-Transformer-Semantic-Segmentation,
used by LAVT/CrossVLT) which equals HF `SwinBackbone` (`always_partition=True`): every block
pads its (H, W) map to a multiple of the window (480² input, window 12: stage 3 30→36,
stage 4 15→24), odd blocks shift by window // 2 with the −100 shift mask, and padding is
cropped afterwards (the padding tokens are zeros after `norm1`, so their q/k/v are the projection
biases: only the real tokens are projected, the same result with fewer multiply-adds, see
`SwinTransformer.window_padding_macs`). With `always_partition=False` a block whose map has
min(H, W) <= window uses window = min(H, W) and no shift, as HF `SwinModel` and the official
classification code do; if that window is smaller than the trained one, the bias is read from
the trained table at the same relative offsets.

The model is decomposable so the VIPA fusion encoder can interleave fusion between stages:

    x = model.embed(images)                    # (B, H/4, W/4, C)
    for i in range(model.num_stages):
        x = model.run_stage(i, x, deterministic=...)   # blocks of stage i, no downsample
        feat_i = model.stage_norm(i, x)        # per-stage output LayerNorm
        if i < model.num_stages - 1:
            x = model.merge(i, x)              # (B, ceil(H/2), ceil(W/2), 2C)

(call these from inside a parent module's method, or via `model.apply(..., method=...)`).

Parameter tree (`params` collection; i = stage, j = block):
    patch_embed/proj/{kernel (p, p, 3, C), bias}        Conv p×p stride p
    patch_embed/norm/{scale, bias}
    layers_{i}/blocks_{j}/norm1/{scale, bias}
    layers_{i}/blocks_{j}/relative_position_bias_table  ((2w-1)², heads)
    layers_{i}/blocks_{j}/attn/{query, key, value, out}/{kernel (C, C), bias}
    layers_{i}/blocks_{j}/norm2/{scale, bias}
    layers_{i}/blocks_{j}/mlp/{fc1 (C, rC), fc2 (rC, C)}/{kernel, bias}
    downsample_{i}/norm/{scale, bias}                   LayerNorm(4C), i < num_stages - 1
    downsample_{i}/reduction/kernel (4C, 2C)            no bias
    norm_{i}/{scale, bias}                              per-stage output norms

With `scan_blocks` and `stacked_params` a stage of at least 4 blocks stores blocks 0 .. 2p − 1
(p = depth // 2 pairs) as `layers_{i}/block_pairs/blocks_{0,1}/...`, every leaf with a leading
(p,) axis: `block_pairs/blocks_0` leaf k is block 2k's, `block_pairs/blocks_1` leaf k block
2k + 1's (`stack_block_pairs` / `unstack_block_pairs` convert between the two layouts).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vipa_jax.backend import target_backend
from vipa_jax.models.layers import (
    ATTENTION_IMPLS,
    QKV_PROJECTIONS,
    SOFTMAX_MODES,
    Dense,
    DropPath,
    LayerNorm,
    Mlp,
    MultiHeadAttention,
    inference_cached,
    materialize_cotangent,
    maybe_remat,
    resize_bilinear_align_corners,
)

Array = jax.Array
Dtype = Any

# (embed_dim, depths, num_heads, window_size) of the released Swin v1 models.
SWIN_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
}
_CONFIG_KEYS = frozenset(
    {"embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "drop_path_rate",
     "patch_size", "always_partition", "layer_norm_eps", "remat", "dtype", "ape", "ape_init",
     "attention_impl", "attention_softmax", "qkv_projection", "scan_blocks", "stacked_params"}
)

_SHIFT_MASK_VALUE = -100.0  # the official / HF additive value for cross-region pairs
_dense_init = nn.initializers.truncated_normal(0.02)


RELATIVE_POSITION_BIAS = "relative_position_bias"  # `SwinBlock`'s inference cache collection


def relative_position_index(window: int, table_window: int | None = None) -> np.ndarray:
    """(T, T) index into a ((2·tw−1)², heads) table for a window×window window, T = window²."""
    tw = window if table_window is None else table_window
    if window > tw:
        raise ValueError(f"window {window} larger than the bias table's window {tw}")
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
    coords = coords.reshape(2, -1)  # (2, T)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (tw - 1)  # (T, T, 2)
    return rel[..., 0] * (2 * tw - 1) + rel[..., 1]


def shift_attention_mask(height: int, width: int, window: int, shift: int) -> Array:
    """(nW, T, T) additive mask (0 / −100) for shifted windows on a padded (height, width) map.

    Built in-graph from the (height, width) region ids so no (nW, T, T) constant is embedded.
    """
    def regions(n: int) -> np.ndarray:
        idx = np.arange(n)
        return (idx >= n - window).astype(np.int32) + (idx >= n - shift).astype(np.int32)

    img = jnp.asarray(regions(height)[:, None] * 3 + regions(width)[None, :])  # (Hp, Wp)
    win = window_partition(img[None, :, :, None], window)[0, ..., 0]  # (nW, T)
    return jnp.where(win[:, None, :] != win[:, :, None], _SHIFT_MASK_VALUE, 0.0)


def window_partition(x: Array, window: int) -> Array:
    """(B, H, W, C) with H, W multiples of window -> (B, nW, window², C)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, window * window, c)


def window_reverse(windows: Array, window: int, height: int, width: int) -> Array:
    """(B, nW, window², C) -> (B, height, width, C); inverse of `window_partition`."""
    b, _, _, c = windows.shape
    x = windows.reshape(b, height // window, width // window, window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


def _round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n (a padded map side)."""
    return -(-n // multiple) * multiple


def _pad_hw(x: Array, multiple_h: int, multiple_w: int, fill: Array | None = None) -> Array:
    """Pad (B, H, W, C) at the bottom/right to multiples of (multiple_h, multiple_w).

    The new tokens are zeros, or the (C,) vector `fill`.
    """
    _, h, w, _ = x.shape
    ph, pw = _round_up(h, multiple_h) - h, _round_up(w, multiple_w) - w
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
        if fill is not None:
            # x + 1[padding]·fill: exact (0·fill = 0), fuses with the pad, and its backward
            # keeps only the constant indicator; a `where` would keep its broadcast mask
            # (3 × 0.66 MB per image and block in stage 3 at 480); a concatenation ran slower
            # (Swin-B forward on CPU, two A/B rounds).
            pad = np.ones(x.shape[1:3] + (1,), np.float32)
            pad[:h, :w] = 0.0
            x = x + jnp.asarray(pad, x.dtype) * fill.astype(x.dtype)
    return x


class PatchEmbed(nn.Module):
    """Pad to a multiple of the patch size, p×p stride-p conv, LayerNorm: (B,H,W,3)->(B,h,w,C)."""

    embed_dim: int
    patch_size: int = 4
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: Array) -> Array:
        p = self.patch_size
        x = _pad_hw(images, p, p)  # (B, Hp, Wp, 3)
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID",
                    dtype=self.dtype, name="proj")(x)  # (B, Hp/p, Wp/p, C)
        return LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="norm")(x)


APE_INITS = ("trunc_normal", "sine")


def sine_position_table(height: int, width: int, dim: int) -> np.ndarray:
    """(1, h, w, C) 2-D sinusoidal code: C/2 channels encode the row, C/2 the column.

    Each half holds sin/cos pairs of the normalized cell centre at frequencies spaced
    geometrically from 1/2 to 5 cycles across the grid, so every entry is in [-1, 1], on the
    scale of the LayerNorm-ed patch tokens it is added to.
    """
    if dim % 4:
        raise ValueError(f"a sine position table needs embed_dim divisible by 4, got {dim}")
    quarter = dim // 4

    def axis_code(n: int) -> np.ndarray:  # (n, C/2)
        pos = (np.arange(n) + 0.5) / n * 2 * np.pi
        freqs = 0.5 * 10.0 ** (np.arange(quarter) / max(quarter - 1, 1))
        angles = pos[:, None] * freqs[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)

    rows = np.broadcast_to(axis_code(height)[:, None], (height, width, dim // 2))
    cols = np.broadcast_to(axis_code(width)[None], (height, width, dim // 2))
    return np.concatenate([rows, cols], axis=-1)[None].astype(np.float32)


class AbsolutePositionEmbedding(nn.Module):
    """Swin's `ape`: x + a learned (1, h, w, C) table on the patch grid.

    `init`: 'trunc_normal' (Swin's, std 0.02) or 'sine' (`sine_position_table`: a learnable
    table that carries absolute position from the first step). The table takes the grid of the
    first (init) call; other grids get it bilinearly resized.
    """

    embed_dim: int
    init: str = "trunc_normal"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        grid = tuple(x.shape[1:3])  # x (B, h, w, C)
        if self.has_variable("params", "table"):  # the grid it was created on may differ
            table = self.get_variable("params", "table")
        else:
            if self.init == "trunc_normal":
                init_fn = nn.initializers.truncated_normal(0.02)
            elif self.init == "sine":
                def init_fn(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
                    return jnp.asarray(sine_position_table(*shape[1:]), dtype)
            else:
                raise ValueError(f"swin.ape_init must be one of {APE_INITS}, got {self.init!r}")
            table = self.param("table", init_fn, (1, *grid, self.embed_dim))
        if tuple(table.shape[1:3]) != grid:
            table = resize_bilinear_align_corners(table, grid, axes=(1, 2))
        return x + table.astype(x.dtype)


class SwinBlock(nn.Module):
    """One Swin block: x + DropPath(W-MSA/SW-MSA(LN(x))), then x + DropPath(MLP(LN(x)))."""

    num_heads: int
    window_size: int
    shift_size: int = 0
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    always_partition: bool = True
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    attention_impl: str = "einsum"  # layers.dot_product_attention's implementation
    attention_softmax: str = "deferred"  # MultiHeadAttention.softmax
    qkv_projection: str = "auto"  # MultiHeadAttention.qkv_projection

    def effective_window(self, height: int, width: int) -> tuple[int, int]:
        """(window, shift) actually used on a (height, width) map."""
        if not self.always_partition and min(height, width) <= self.window_size:
            return min(height, width), 0
        return self.window_size, self.shift_size

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True,
                 drop_path: Array | None = None) -> Array:
        """(B, H, W, C) -> (B, H, W, C). `drop_path`: the rate, replacing the attribute (traced,
        when `SwinStage` scans its blocks)."""
        _, h, w, c = x.shape
        window, shift = self.effective_window(h, w)
        ln = functools.partial(LayerNorm, self.layer_norm_eps, dtype=self.dtype)
        table = self.param(
            "relative_position_bias_table",
            nn.initializers.truncated_normal(0.02),
            ((2 * self.window_size - 1) ** 2, self.num_heads),
        )  # ((2w-1)², heads), float32

        hp, wp = _round_up(h, window), _round_up(w, window)  # the padded map

        def to_windows(t: Array, fill: Array | None = None) -> Array:
            """(B, H, W, C') -> (B, nW, T, C'): pad (with `fill`), shift, partition."""
            t = _pad_hw(t, window, window, fill)  # (B, Hp, Wp, C')
            if shift:
                t = jnp.roll(t, (-shift, -shift), axis=(1, 2))
            return window_partition(t, window)

        def from_windows(t: Array) -> Array:
            """(B, nW, T, C') -> (B, H, W, C'): the inverse, cropping the padding."""
            t = window_reverse(t, window, hp, wp)  # (B, Hp, Wp, C')
            if shift:
                t = jnp.roll(t, (shift, shift), axis=(1, 2))
            return t[:, :h, :w, :]

        bias = self.relative_position_bias(table, window)  # (heads, T, T)
        if target_backend() != "cpu":
            # Its gradient: the score gradients summed over batch and windows, then scattered
            # into the table through a (T·T, heads) transpose. XLA:GPU fused that sum into the
            # transpose (stages 2-4), each output element looping over all B·nW windows;
            # materialized first, it is a reduction kernel (as stage 1's already was). On CPU
            # the barrier bought nothing (demo train step: 287 vs 282 ms, within noise).
            bias = materialize_cotangent(bias)
        if shift:
            mask = shift_attention_mask(hp, wp, window, shift)  # (nW, T, T)
            bias = bias[None] + mask[:, None]  # (nW, heads, T, T)
        attn = MultiHeadAttention(
            self.num_heads, use_output_proj=True, dtype=self.dtype,
            kernel_init=_dense_init, implementation=self.attention_impl,
            softmax=self.attention_softmax, qkv_projection=self.qkv_projection, name="attn",
        )
        x_norm = ln(name="norm1")(x)  # (B, H, W, C)
        if (hp, wp) != (h, w):
            # The padding tokens are zeros after norm1, so their q/k/v are the biases: project
            # the H·W real tokens, then pad and window q/k/v (the output projection runs after
            # the crop). Same result; stage 3 at 480 projects 900 tokens instead of 1296.
            y = attn(x_norm, bias=bias, deterministic=deterministic,
                     regroup=to_windows, ungroup=from_windows)  # (B, H, W, C)
        else:  # windowing the input once is cheaper than windowing q, k and v
            y = from_windows(attn(to_windows(x_norm), bias=bias, deterministic=deterministic))
        # two DropPath modules (DropPath_0, DropPath_1): each its own rng stream
        x = x + DropPath(self.drop_path)(y, deterministic=deterministic, rate=drop_path)

        y = Mlp(int(c * self.mlp_ratio), dtype=self.dtype, kernel_init=_dense_init,
                name="mlp")(ln(name="norm2")(x), deterministic=deterministic)
        return x + DropPath(self.drop_path)(y, deterministic=deterministic, rate=drop_path)

    def relative_position_bias(self, table: Array, window: int) -> Array:
        """B of Eq. (softmax(QKᵀ/√d + B)V): the table gathered to (heads, T, T). For inference
        on a CPU it may be precomputed once (`vipa.with_inference_cache`) into the
        `RELATIVE_POSITION_BIAS` collection (variable 'bias'), which is then read instead (the
        collection mutable, outside `init`, stores it): the gather and transpose took 18 ms of
        Swin-B's op time per forward at 480 on the 2-core AMX VM. Not tied to the table:
        rebuild it whenever the params change, and never differentiate through it."""
        def gather() -> Array:
            index = relative_position_index(window, self.window_size).astype(np.int32)  # (T, T)
            return jnp.transpose(table[index], (2, 0, 1))  # (heads, T, T)

        return inference_cached(self, RELATIVE_POSITION_BIAS, "bias",
                                (self.num_heads, window * window, window * window), gather,
                                store=target_backend() == "cpu", what=f" for window {window}")


BLOCK_PAIRS = "block_pairs"  # a stage's stacked block-pair parameters (`stacked_params`)
_BLOCK_KEY = re.compile(r"blocks_(\d+)$")
_STAGE_KEY = re.compile(r"layers_\d+$")


def scanned_pairs(depth: int) -> int:
    """How many (unshifted, shifted) block pairs `scan_blocks` scans in a stage of `depth`
    blocks: all of them from 4 blocks on, none below."""
    return depth // 2 if depth >= 4 else 0


def _stack_pairs(stage: Mapping[str, Any], pairs: int) -> dict[str, Any]:
    """A stage's `blocks_{j}` subtrees (j < 2·pairs) -> the `block_pairs` tree."""
    return {f"blocks_{i}": jax.tree.map(lambda *p: jnp.stack(p), *[
        stage[f"blocks_{2 * k + i}"] for k in range(pairs)]) for i in range(2)}


def _take(leaf: Any, k: int) -> Any:
    """Row k of a stacked leaf (an array or a `jax.ShapeDtypeStruct`)."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    return leaf[k]


def _map_stages(tree: Any, fn: Any) -> Any:
    """`tree` (nested dicts) with `fn` applied to every dict under a `layers_{i}` key, at any
    depth (Swin's params alone or inside VIPA's); other nodes are kept."""
    if not isinstance(tree, Mapping):
        return tree
    return {k: fn(v) if _STAGE_KEY.match(str(k)) and isinstance(v, Mapping)
            else _map_stages(v, fn) for k, v in tree.items()}


def stack_block_pairs(tree: Any) -> Any:
    """Unrolled layout -> `stacked_params` layout: in every Swin stage of `tree` with at least 4
    `blocks_{j}`, blocks 0 .. 2p − 1 move into `block_pairs` (leaves stacked on a new axis 0)."""
    def stage(node: Mapping[str, Any]) -> dict[str, Any]:
        depth = sum(bool(_BLOCK_KEY.match(str(k))) for k in node)
        pairs = scanned_pairs(depth)
        if not pairs or BLOCK_PAIRS in node:
            return dict(node)
        out = {k: v for k, v in node.items()
               if not ((m := _BLOCK_KEY.match(str(k))) and int(m[1]) < 2 * pairs)}
        out[BLOCK_PAIRS] = _stack_pairs(node, pairs)
        return out

    return _map_stages(tree, stage)


def unstack_block_pairs(tree: Any) -> Any:
    """`stacked_params` layout -> unrolled layout (the inverse of `stack_block_pairs`): each
    `block_pairs` becomes `blocks_{2k}` and `blocks_{2k + 1}`. Abstract leaves are allowed."""
    def stage(node: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in node.items() if k != BLOCK_PAIRS}
        if BLOCK_PAIRS in node:
            stacked = node[BLOCK_PAIRS]
            pairs = jax.tree.leaves(stacked)[0].shape[0]
            for k in range(pairs):
                for i in range(2):
                    out[f"blocks_{2 * k + i}"] = jax.tree.map(
                        lambda leaf, k=k: _take(leaf, k), stacked[f"blocks_{i}"])
        return out

    return _map_stages(tree, stage)


def has_block_pairs(tree: Any) -> bool:
    """Whether `tree` holds a stage in the `stacked_params` layout."""
    found: list[bool] = []

    def note(node: Mapping[str, Any]) -> Mapping[str, Any]:
        found.append(BLOCK_PAIRS in node)
        return node

    _map_stages(tree, note)
    return any(found)


def relayout_block_pairs(tree: Any, template: Any) -> Any:
    """`tree`'s leaves arranged as `template`, which holds the same state with Swin's block
    pairs in the other layout (stacked ↔ unrolled): any pytree, e.g. a whole train state, whose
    optimizer moments mirror the params. A template leaf under `layers_i/block_pairs/blocks_r/…`
    stacks `tree`'s `layers_i/blocks_{2k+r}/…` (k < its leading size), one under
    `layers_i/blocks_j/…` that `tree` lacks takes row j // 2 of `layers_i/block_pairs/
    blocks_{j % 2}/…`, and every other leaf is taken by its path. Traceable (jit it with the
    target shardings); a leaf it cannot find is a KeyError naming its path."""
    def names(path: Any) -> tuple[str, ...]:  # dict keys, attribute names, indices
        return tuple(jax.tree_util.keystr((k,), simple=True) for k in path)

    src = {names(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def get(key: tuple[str, ...]) -> Any:
        if key not in src:
            raise KeyError(f"relayout_block_pairs: no leaf {'/'.join(key)} in the source tree")
        return src[key]

    def fill(path: Any, like: Any) -> Any:
        key = names(path)
        if key in src:
            return src[key]
        for i in range(len(key) - 2):
            if not _STAGE_KEY.match(key[i]):
                continue
            stage, rest = key[:i + 1], key[i + 2:]
            if key[i + 1] == BLOCK_PAIRS and (m := _BLOCK_KEY.match(key[i + 2])):
                r = int(m[1])
                return jnp.stack([get((*stage, f"blocks_{2 * k + r}", *key[i + 3:]))
                                  for k in range(like.shape[0])])
            if m := _BLOCK_KEY.match(key[i + 1]):
                j = int(m[1])
                return get((*stage, BLOCK_PAIRS, f"blocks_{j % 2}", *rest))[j // 2]
        return get(key)

    return jax.tree_util.tree_map_with_path(fill, template)


class SwinStage(nn.Module):
    """The blocks of one Swin stage (no downsampling): (B, H, W, C) -> (B, H, W, C).

    `scan_blocks`: run the (unshifted, shifted) block pairs as one `lax.scan` over their
    parameters, stacked at call time (`scan_block_pairs`); the parameter tree, the function and
    the gradients stay those of the unrolled stage, while XLA compiles one pair instead of
    depth / 2: the paper model's bfloat16 train step, compiled for an H200 without a GPU, 173 →
    152 s with stage 3's 9 pairs scanned, for 998 more kernel launches per step
    (benchmarks/README.md). Drop-path draws other random numbers than unrolled.

    `stacked_params` (with `scan_blocks`): the pairs' parameters are stored stacked
    (`block_pairs`, see the module docstring) instead of being stacked at every call, so the
    step neither copies them into stacks nor splits their gradients, and the optimizer has one
    leaf per parameter of a pair instead of one per block: the same bfloat16 train step
    (cuDNN attention, cuBLAS GEMMs) compiled for an H200 in 86–90 instead of 96–104 s. The
    same function; the tree differs (`stack_block_pairs` converts), and so does the random
    init.
    """

    depth: int
    num_heads: int
    window_size: int
    mlp_ratio: float = 4.0
    drop_path_rates: Sequence[float] = ()
    always_partition: bool = True
    layer_norm_eps: float = 1e-5
    remat: bool | str = False  # False, True ('full') or a name of layers.REMAT_POLICIES
    dtype: Dtype = jnp.float32
    attention_impl: str = "einsum"
    attention_softmax: str = "deferred"
    qkv_projection: str = "auto"
    scan_blocks: bool = False  # scan the block pairs of a stage with at least two pairs
    stacked_params: bool = False  # ... their parameters stored stacked (`block_pairs`)

    @property
    def rates(self) -> tuple[float, ...]:
        """The drop-path rate of each block (all 0 when `drop_path_rates` is empty)."""
        rates = tuple(self.drop_path_rates) or (0.0,) * self.depth
        if len(rates) != self.depth:
            raise ValueError(f"{len(rates)} drop_path_rates for a stage of depth {self.depth}")
        return rates

    def block(self, j: int, *, bound: bool = True) -> nn.Module:
        """Block j (shifted when j is odd), a child `blocks_{j}`, or unbound (`bound=False`: a
        module to `apply` to block j's parameters)."""
        # static_argnums counts `self` as 0, so 2 is `deterministic`.
        block_cls = maybe_remat(SwinBlock, self.remat, static_argnums=(2,))
        return block_cls(
            num_heads=self.num_heads,
            window_size=self.window_size,
            shift_size=0 if j % 2 == 0 else self.window_size // 2,
            mlp_ratio=self.mlp_ratio,
            drop_path=self.rates[j],
            always_partition=self.always_partition,
            layer_norm_eps=self.layer_norm_eps,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            attention_softmax=self.attention_softmax,
            qkv_projection=self.qkv_projection,
            **({"name": f"blocks_{j}"} if bound else {"parent": None}),
        )

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        self.rates  # noqa: B018 - checks drop_path_rates before anything runs
        if self.stacked_params and not self.scan_blocks:
            raise ValueError("swin.stacked_params=True needs swin.scan_blocks=True")
        pairs = scanned_pairs(self.depth) if self.scan_blocks else 0
        if pairs and self.stacked_params:
            stacked = self.param(BLOCK_PAIRS, self.init_block_pairs, x, pairs)
            x = self.scan_block_pairs(x, stacked, deterministic)
        elif pairs and not self.is_initializing():  # init runs unrolled: it makes `blocks_{j}`
            params = self.variables["params"]
            x = self.scan_block_pairs(x, _stack_pairs(params, pairs), deterministic)
        else:
            pairs = 0
        for j in range(2 * pairs, self.depth):
            x = self.block(j)(x, deterministic)
        return x

    def pair_blocks(self) -> tuple[nn.Module, nn.Module]:
        """The (unshifted, shifted) blocks of a pair, unbound: what `scan_block_pairs` applies
        to each pair's parameters and `init_block_pairs` initializes them with."""
        return self.block(0, bound=False), self.block(1, bound=False)

    def init_block_pairs(self, rng: Array, x: Array, pairs: int) -> dict[str, Any]:
        """A fresh `block_pairs` tree: each pair's two blocks initialized on `x[:1]`."""
        blocks = self.pair_blocks()

        def one(key: Array) -> dict[str, Any]:
            keys = jax.random.split(key, len(blocks))
            return {f"blocks_{i}": blk.init({"params": k}, x[:1], True)["params"]
                    for i, (blk, k) in enumerate(zip(blocks, keys, strict=True))}

        return jax.vmap(one)(jax.random.split(rng, pairs))  # leaves (pairs, ...)

    def scan_block_pairs(self, x: Array, stacked: dict[str, Any], deterministic: bool) -> Array:
        """Blocks 0 .. 2·pairs − 1 as a `lax.scan` over the pairs (blocks 2i, 2i + 1), given
        their parameters stacked (`block_pairs` layout): (B, H, W, C) -> (B, H, W, C)."""
        pairs = jax.tree.leaves(stacked)[0].shape[0]
        rates = self.rates[:2 * pairs]
        pair_rates = jnp.asarray(rates, jnp.float32).reshape(pairs, 2)
        keys = (jax.random.split(self.make_rng("dropout"), (pairs, 2))
                if not deterministic and any(rates) else None)
        blocks = self.pair_blocks()

        def pair(h: Array, xs: tuple[Any, Array, Array | None]) -> tuple[Array, None]:
            p, r, k = xs
            for i, blk in enumerate(blocks):
                rngs = {"dropout": k[i]} if k is not None else {}
                h = blk.apply({"params": p[f"blocks_{i}"]}, h, deterministic,
                              r[i] if k is not None else None, rngs=rngs)
            return h, None

        x, _ = jax.lax.scan(pair, x, (stacked, pair_rates, keys))
        return x


class PatchMerging(nn.Module):
    """Pad odd H/W, gather 2×2 neighbours, LayerNorm(4C), Linear 4C→2C (no bias)."""

    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""
        c = x.shape[-1]
        x = _pad_hw(x, 2, 2)
        # Official order x0..x3 = (0,0), (1,0), (0,1), (1,1) as (row, col) offsets.
        x = jnp.concatenate(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1
        )  # (B, H/2, W/2, 4C)
        x = LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="norm")(x)
        return Dense(2 * c, use_bias=False, dtype=self.dtype, kernel_init=_dense_init,
                        name="reduction")(x)


class SwinTransformer(nn.Module):
    """Swin v1 backbone returning the 4 normed stage outputs [(B, H_i, W_i, C_i)]."""

    embed_dim: int = 128
    depths: Sequence[int] = (2, 2, 18, 2)
    num_heads: Sequence[int] = (4, 8, 16, 32)
    window_size: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    patch_size: int = 4
    always_partition: bool = True  # segmentation / SwinBackbone behaviour; False = SwinModel
    layer_norm_eps: float = 1e-5
    remat: bool | str = False  # False, True ('full') or a name of layers.REMAT_POLICIES
    dtype: Dtype = jnp.float32  # compute dtype; params are float32
    ape: bool = False  # learned absolute position embedding on the patch grid (Swin's `ape`)
    ape_init: str = "trunc_normal"  # or 'sine' (see AbsolutePositionEmbedding)
    # Window attention: 'einsum' (ours), 'xla' / 'cudnn' (jax.nn.dot_product_attention's; cuDNN's
    # fused attention needs a GPU and float16 / bfloat16 compute).
    attention_impl: str = "einsum"
    # The window attention's softmax, 'deferred' | 'normalized' | 'compact', and q/k/v
    # projection, 'auto' | 'fused' (one (C, 3C) GEMM and one window partition) | 'separate';
    # the same parameters and function either way (layers.MultiHeadAttention).
    attention_softmax: str = "deferred"
    qkv_projection: str = "auto"
    # Stages with at least 4 blocks run their block pairs as one lax.scan (SwinStage): the same
    # parameters and function, a smaller program to compile.
    scan_blocks: bool = False
    # ... and their parameters stored stacked (`block_pairs`): a smaller step and optimizer
    stacked_params: bool = False

    @classmethod
    def from_config(
        cls, config: str | Mapping[str, Any] | Any, **overrides: Any
    ) -> SwinTransformer:
        """Build from a preset name in SWIN_CONFIGS or a dict / ml_collections.ConfigDict."""
        if isinstance(config, str):
            if config not in SWIN_CONFIGS:
                raise ValueError(
                    f"unknown Swin preset {config!r}; choose from {list(SWIN_CONFIGS)}"
                )
            kwargs = dict(SWIN_CONFIGS[config])
        else:
            kwargs = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        kwargs.update(overrides)
        unknown = set(kwargs) - _CONFIG_KEYS
        if unknown:
            raise ValueError(f"unknown Swin config keys {sorted(unknown)}; "
                             f"allowed: {sorted(_CONFIG_KEYS)}")
        for key in ("depths", "num_heads"):
            if key in kwargs:
                kwargs[key] = tuple(int(v) for v in kwargs[key])
        if isinstance(kwargs.get("dtype"), str):
            kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
        return cls(**kwargs)

    @property
    def num_stages(self) -> int:
        """Number of stages (4 for every released Swin)."""
        return len(self.depths)

    @property
    def num_features(self) -> tuple[int, ...]:
        """Channels of each stage output: (C, 2C, 4C, 8C)."""
        return tuple(self.embed_dim * 2**i for i in range(self.num_stages))

    def window_padding_macs(self, image_hw: tuple[int, int]) -> int:
        """Multiply-adds per image that the reference Swin (official, HF, LAVT) spends on the
        q/k/v and output projections of window-padding tokens, and this one skips (SwinBlock).
        Swin-B at 480: 10.4 G of its 85.2 G."""
        h, w = (_round_up(s, self.patch_size) // self.patch_size for s in image_hw)
        total = 0
        for i, (depth, c) in enumerate(zip(self.depths, self.num_features, strict=True)):
            block = SwinBlock(self.num_heads[i], self.window_size,
                              always_partition=self.always_partition, parent=None)
            win, _ = block.effective_window(h, w)  # the same for every block of the stage
            padding_tokens = _round_up(h, win) * _round_up(w, win) - h * w
            total += depth * 4 * c * c * padding_tokens  # q, k, v and out: C×C each
            h, w = _round_up(h, 2) // 2, _round_up(w, 2) // 2  # patch merging
        return total

    def setup(self) -> None:
        for key, allowed in (("attention_impl", ATTENTION_IMPLS),
                             ("attention_softmax", SOFTMAX_MODES),
                             ("qkv_projection", QKV_PROJECTIONS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"swin.{key} must be one of {allowed}, "
                                 f"got {getattr(self, key)!r}")
        if len(self.depths) != len(self.num_heads):
            raise ValueError(
                f"depths {self.depths} and num_heads {self.num_heads} differ in length"
            )
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
        starts = np.cumsum((0, *self.depths)).tolist()
        self.patch_embed = PatchEmbed(self.embed_dim, self.patch_size, self.layer_norm_eps,
                                      dtype=self.dtype)
        self.layers = [
            SwinStage(
                depth=self.depths[i],
                num_heads=self.num_heads[i],
                window_size=self.window_size,
                mlp_ratio=self.mlp_ratio,
                drop_path_rates=tuple(rates[starts[i]:starts[i + 1]]),
                always_partition=self.always_partition,
                layer_norm_eps=self.layer_norm_eps,
                remat=self.remat,
                dtype=self.dtype,
                attention_impl=self.attention_impl,
                attention_softmax=self.attention_softmax,
                qkv_projection=self.qkv_projection,
                scan_blocks=self.scan_blocks,
                stacked_params=self.stacked_params,
            )
            for i in range(self.num_stages)
        ]
        self.downsample = [
            PatchMerging(self.layer_norm_eps, dtype=self.dtype)
            for _ in range(self.num_stages - 1)
        ]
        self.norm = [
            LayerNorm(self.layer_norm_eps, dtype=self.dtype) for _ in range(self.num_stages)
        ]
        if self.ape:
            self.absolute_pos_embed = AbsolutePositionEmbedding(self.embed_dim, self.ape_init)

    def embed(self, images: Array) -> Array:
        """(B, H, W, 3) -> (B, ceil(H/p), ceil(W/p), C) patch tokens (+ APE when `ape`)."""
        x = self.patch_embed(images.astype(self.dtype))
        if self.ape:
            x = self.absolute_pos_embed(x)
        return x


    def run_stage(self, i: int, x: Array, deterministic: bool = True) -> Array:
        """Blocks of stage i (no downsampling): (B, H, W, C_i) -> (B, H, W, C_i)."""
        return self.layers[i](x, deterministic)

    def stage_norm(self, i: int, x: Array) -> Array:
        """Per-stage output LayerNorm `norm_{i}`."""
        return self.norm[i](x)

    def merge(self, i: int, x: Array) -> Array:
        """Patch merging after stage i (i < num_stages-1): (B,H,W,C)->(B,ceil(H/2),ceil(W/2),2C)."""
        if not 0 <= i < self.num_stages - 1:
            raise ValueError(
                f"no patch merging after stage {i} (last stage is {self.num_stages - 1})"
            )
        return self.downsample[i](x)

    def __call__(self, images: Array, *, deterministic: bool = True) -> list[Array]:
        """(B, H, W, 3) -> [(B, H/4, W/4, C), (B, H/8, W/8, 2C), ..., (B, H/32, W/32, 8C)]."""
        x = self.embed(images)
        feats = []
        for i in range(self.num_stages):
            x = self.run_stage(i, x, deterministic)
            feats.append(self.stage_norm(i, x))
            if i < self.num_stages - 1:
                x = self.merge(i, x)
        return feats
