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

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vipa_jax.backend import target_backend

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

# Matches HF's additive mask (finfo.min) closely enough for parity, without overflowing when
# a bias is added to it.
_MASK_VALUE = -1e9


DOT_RESULTS = ("auto", "float32", "native")
_DOT_RESULTS: list[str] = []


@contextlib.contextmanager
def dot_results(mode: str) -> Iterator[None]:
    """Within this block the model's matmuls (`dot_general`, `einsum`, `matmul`, `Dense`) on
    bfloat16/float16 operands ask XLA for `mode`'s results: 'float32' (rounded back to the
    operands' dtype afterwards), 'native' (results in the operands' dtype, XLA's default) or
    'auto' (float32 on a CPU backend, native elsewhere). `VIPA.__call__` enters it with
    `model.dot_results`. The values are the same either way up to the order of the float32
    accumulation; the speed is not on XLA:CPU (`dot_general`)."""
    if mode not in DOT_RESULTS:
        raise ValueError(f"model.dot_results must be one of {DOT_RESULTS}, got {mode!r}")
    _DOT_RESULTS.append(mode)
    try:
        yield
    finally:
        _DOT_RESULTS.pop()


def float32_dot_results() -> bool:
    """Whether low-precision matmuls ask for float32 results here (`dot_results`)."""
    mode = _DOT_RESULTS[-1] if _DOT_RESULTS else "auto"
    return mode == "float32" or (mode == "auto" and target_backend() == "cpu")


def _low_precision(*operands: Any) -> Any:
    """The operands' common dtype if it is a sub-32-bit float, else None."""
    dt = jnp.result_type(*operands)
    return dt if jnp.issubdtype(dt, jnp.floating) and jnp.finfo(dt).bits < 32 else None


def _library_gemm(lhs: Array, rhs: Array, dimension_numbers: Any) -> bool:
    """Whether XLA:CPU's GEMM library (YNNPACK) takes this product: leading batch dims, the
    lhs contracting its last dims and the rhs its first after the batch ((..., M, K)·(..., K, N))
    or its last ((..., M, K)·(..., N, K)ᵀ, `Dense`'s transposed kernels), M, N > 1 and a side of
    at least 8 (`IsDotSupportedByYnn`). XLA sends a bf16 × bf16 → f32 product it rejects to its
    own dot, which cannot run that type ("Unsupported element type for DotThunk::Execute: BF16
    x BF16 = F32", jax 0.10), so only these ask for it."""
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(int(d) for d in t) for t in (lc, rc, lb, rb))
    nb, nc = len(lb), len(lc)
    if lb != tuple(range(nb)) or rb != lb or lc != tuple(range(lhs.ndim - nc, lhs.ndim)):
        return False
    if rc == tuple(range(nb, nb + nc)):  # (..., K, N)
        n = math.prod(rhs.shape[nb + nc:])
    elif rc == tuple(range(rhs.ndim - nc, rhs.ndim)):  # (..., N, K)
        n = math.prod(rhs.shape[nb:rhs.ndim - nc])
    else:
        return False
    m = math.prod(lhs.shape[nb:lhs.ndim - nc])
    k = math.prod(lhs.shape[lhs.ndim - nc:])
    return m > 1 and n > 1 and max(m, k, n) >= 8


def dot_general(lhs: Array, rhs: Array, dimension_numbers: Any, precision: Any = None,
                preferred_element_type: Any = None, **kwargs: Any) -> Array:
    """`lax.dot_general`; a bfloat16/float16 product under float32 `dot_results` asks for
    float32 results and rounds them back. XLA:CPU runs bf16 × bf16 → f32 as one GEMM of its
    GEMM library (AMX or AVX512-BF16 where the CPU has them), while for a bf16 result it
    converts both operands to float32 first: on a 2-core AMX host (3600×1024)·(1024×1024)
    takes 5.2 instead of 25.4 ms (benchmarks/README.md, "bfloat16 on a CPU"). Only products
    that library takes ask for it (`_library_gemm`); others keep their type."""
    return _product_fn()(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)


def _product_fn() -> Callable[..., Array]:
    """The `lax.dot_general` stand-in for the current `dot_results`."""
    return _float32_result_dot if float32_dot_results() else jax.lax.dot_general


def _widened_dtype(lhs: Any, rhs: Any, dimension_numbers: Any) -> Any:
    """The low-precision dtype of a product XLA:CPU's GEMM library takes (which may then ask
    for float32 results), else None."""
    low = _low_precision(lhs, rhs)
    return low if low and _library_gemm(lhs, rhs, dimension_numbers) else None


def asks_float32_results(lhs: Array, rhs: Array, dimension_numbers: Any) -> bool:
    """Whether `dot_general` asks for float32 results for this product here: low-precision
    operands, float32 `dot_results`, a product XLA:CPU's GEMM library takes."""
    return float32_dot_results() and _widened_dtype(lhs, rhs, dimension_numbers) is not None


def _float32_result_dot(lhs: Array, rhs: Array, dimension_numbers: Any, precision: Any = None,
                        preferred_element_type: Any = None, **kwargs: Any) -> Array:
    """`dot_general` under float32 `dot_results`."""
    low = _widened_dtype(lhs, rhs, dimension_numbers)
    if low and preferred_element_type in (None, low):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=jnp.float32, **kwargs).astype(low)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)


def einsum(subscripts: str, *operands: Array) -> Array:
    """`jnp.einsum` whose products are `dot_general`'s. (jnp.einsum caches its trace by the
    product function it is given, so each `dot_results` choice passes its own.)"""
    return jnp.einsum(subscripts, *operands, _dot_general=_product_fn())


def matmul(a: Array, b: Array) -> Array:
    """`a @ b` as `dot_general`'s product, for a matrix `b` or operands of one batch shape
    (others broadcast as `jnp.matmul` does)."""
    if a.ndim >= 1 and b.ndim == 2:
        return dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())))
    if a.ndim < 2 or a.shape[:-2] != b.shape[:-2]:
        return jnp.matmul(a, b)
    nb = a.ndim - 2
    batch = tuple(range(nb))
    return dot_general(a, b, (((a.ndim - 1,), (nb,)), (batch, batch)))


TRANSPOSED_KERNELS = "transposed_kernels"  # `Dense`'s inference cache collection
# `prefers_transposed_kernel`: at most this many input rows, at least this many weights.
TRANSPOSED_KERNEL_MAX_ROWS = 128
TRANSPOSED_KERNEL_MIN_WEIGHTS = 1 << 16


def prefers_transposed_kernel(rows: int, in_features: int, features: int) -> bool:
    """Whether a `Dense` on `rows` input rows runs faster from its kernel stored transposed,
    (F, C): on a CPU backend, at most 128 rows and at least 2^16 weights. XLA:CPU's GEMM library
    (YNNPACK) repacks a (C, F) right-hand side on every call, which for few rows costs more
    than the product; PyTorch's Linear keeps (out, in) weights. BERT-base at 21 tokens took 35
    instead of 53 ms on a 2-core Intel AMX VM; the gain shrinks with the rows (5% at 336) while
    the cache costs memory (benchmarks/README.md, "Inference caches")."""
    return (target_backend() == "cpu" and rows <= TRANSPOSED_KERNEL_MAX_ROWS
            and in_features * features >= TRANSPOSED_KERNEL_MIN_WEIGHTS)


class Dense(nn.Dense):
    """`nn.Dense` (the same parameters and names) whose product is `dot_general`.

    For inference it may multiply by its kernel stored transposed, (F, C), in the
    `TRANSPOSED_KERNELS` collection ('transposed_kernels', variable 'kernel'), which
    `vipa.with_inference_cache` builds for the layers `prefers_transposed_kernel` picks (the
    collection mutable, outside `init`, stores it); the same products in another GEMM form.
    The cache is not tied to `kernel`: rebuild it whenever the params change, and never
    differentiate through it (training variables do not hold it).
    """

    @nn.compact
    def __call__(self, inputs: Array) -> Array:  # (..., C) -> (..., F)
        if self.dot_general is not None or self.dot_general_cls is not None:
            raise ValueError(f"{'/'.join(self.path)}: layers.Dense computes its product with "
                             "layers.dot_general; use nn.Dense for another dot_general")
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        kernel_t = self._transposed_kernel(kernel, math.prod(jnp.shape(inputs)[:-1]))
        # (..., C)·(C, F), or (..., C)·(F, C)ᵀ from the cache
        w, w_in = (kernel, 0) if kernel_t is None else (kernel_t, 1)
        inputs, w, bias = self.promote_dtype(inputs, w, bias, dtype=self.dtype)
        y = dot_general(inputs, w, (((inputs.ndim - 1,), (w_in,)), ((), ())),
                        precision=self.precision)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y

    def _transposed_kernel(self, kernel: Array, rows: int) -> Array | None:
        """The cached (F, C) kernel, if any (stored now when the cache collection is mutable
        and `prefers_transposed_kernel`), else None."""
        storing = (self.is_mutable_collection(TRANSPOSED_KERNELS) and not self.is_initializing()
                   and prefers_transposed_kernel(rows, *kernel.shape))
        if not (storing or self.has_variable(TRANSPOSED_KERNELS, "kernel")):
            return None
        return inference_cached(self, TRANSPOSED_KERNELS, "kernel", kernel.shape[::-1],
                                lambda: kernel.T, store=storing, what=" (the kernel transposed)")


def inference_cached(module: nn.Module, collection: str, name: str, shape: Sequence[int],
                     compute: Callable[[], Array], *, store: bool = True, what: str = "") -> Array:
    """A value inference may precompute from the params (`vipa.with_inference_cache`): the
    module's variable `collection`/`name` when present (its shape checked against `shape`; a
    mismatch names the module and says `what` was expected), else `compute()`, stored when
    `store` and the collection is mutable outside `init`."""
    if module.has_variable(collection, name):
        value = module.get_variable(collection, name)
        if tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"{'/'.join(module.path)}: cached {collection}/{name} has shape "
                f"{tuple(value.shape)}, expected {tuple(shape)}{what}: it was built for other "
                "params or another config; rebuild it with vipa.with_inference_cache")
        return value
    value = compute()
    if store and module.is_mutable_collection(collection) and not module.is_initializing():
        module.put_variable(collection, name, value)
    return value


@jax.custom_jvp
def exact_gelu(x: Array) -> Array:
    """GELU with the exact erf form, x·Φ(x) = x·(1 + erf(x/√2))/2 (BERT, Swin and PyTorch's
    nn.GELU default, which computes this same expression).

    `nn.gelu(x, approximate=False)` computes Φ through `erfc`, which XLA:CPU evaluates 2.5×
    slower than `erf` (14400×512: 4.6 vs 1.9 ms); the two differ by float rounding (≤ 1e-6 here).
    The derivative Φ(x) + x·φ(x) is computed in float32 in the forward and is the one array kept
    for the backward pass (autodiff through flax's form keeps four arrays the size of the MLP's
    hidden layer).
    """
    x = jnp.asarray(x)
    return 0.5 * x * (1 + jax.lax.erf(x * np.asarray(1 / np.sqrt(2), x.dtype)))


@exact_gelu.defjvp
def _exact_gelu_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (x,), (t,) = primals, tangents
    x = jnp.asarray(x)
    xf = x.astype(jnp.float32)
    cdf = 0.5 * (1 + jax.lax.erf(xf * np.float32(1 / np.sqrt(2))))  # Φ(x)
    pdf = jnp.exp(-0.5 * xf * xf) * np.float32(1 / np.sqrt(2 * np.pi))  # φ(x)
    return exact_gelu(x), (cdf + xf * pdf).astype(x.dtype) * t


def cpu_fusion_barrier(x: Array) -> Array:
    """x, computed once by a kernel of its own on XLA:CPU; the identity on other backends.

    XLA:CPU fuses a cheap elementwise producer into every one of its consumers, duplicating it,
    and drops `optimization_barrier`s before it fuses. Along a residual stream of LayerNorms
    (the text path of a train step, forward and backward) each layer's statistics and gradient
    sums then recompute the whole elementwise chain of the layers before it: the test model's
    train step had 167 fusions of ~700 instructions each, and 100k of its 160k HLO lines were
    such chains. XLA:CPU never duplicates a float division, so x / (x·0 + 1) is written out
    once: exactly x for finite x (NaN for ±inf). The test model's float32 train step then
    compiles in 42 instead of 80 s (benchmarks/README.md, "Compile time on a CPU").
    """
    if target_backend() != "cpu":
        return x
    return x / (x * 0 + 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: Array, scale: Array, bias: Array, epsilon: float) -> Array:
    """LayerNorm over the last axis, exactly flax's `nn.LayerNorm` forward (float32 statistics,
    Var = E[x²] − E[x]²), in float32 or wider; the caller casts the result.

    Its backward keeps only x (in its own dtype) and the per-token mean and 1/σ, where autodiff
    of flax's version keeps three float32 arrays the size of x.

    Differentiated on XLA:CPU, its output and its input gradient go through
    `cpu_fusion_barrier`, which halves the compile time of a train step there.
    """
    return _layer_norm(x, scale, bias, epsilon)[0]


def _layer_norm(
    x: Array, scale: Array, bias: Array, epsilon: float,
) -> tuple[Array, tuple[Array, Array, Array, Array]]:
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = xf.mean(-1, keepdims=True)  # (..., 1)
    var = jnp.maximum(0.0, (xf * xf).mean(-1, keepdims=True) - mean * mean)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (x - mean) * (rstd * scale) + bias
    return y, (x, mean, rstd, scale)


def _layer_norm_fwd(
    x: Array, scale: Array, bias: Array, epsilon: float,
) -> tuple[Array, tuple[Array, Array, Array, Array]]:
    y, res = _layer_norm(x, scale, bias, epsilon)
    return cpu_fusion_barrier(y), res


def _layer_norm_bwd(
    epsilon: float, res: tuple[Array, Array, Array, Array], g: Array,
) -> tuple[Array, Array, Array]:
    del epsilon
    x, mean, rstd, scale = res
    g = g.astype(rstd.dtype)
    xhat = (x - mean) * rstd
    lead = tuple(range(x.ndim - 1))
    gs = g * scale
    dx = rstd * (gs - gs.mean(-1, keepdims=True) - xhat * (gs * xhat).mean(-1, keepdims=True))
    return (cpu_fusion_barrier(dx).astype(x.dtype), (g * xhat).sum(lead).astype(scale.dtype),
            g.sum(lead).astype(scale.dtype))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@jax.custom_vjp
def materialize_cotangent(x: Array) -> Array:
    """The identity, whose backward writes the incoming cotangent out before using it (an
    `optimization_barrier`): XLA cannot fuse the ops that compute it into the ops that consume
    it. For a small cotangent summed from a large one (a bias broadcast over windows), that
    keeps the sum a reduction kernel of its own."""
    return x


def _materialize_cotangent_fwd(x: Array) -> tuple[Array, None]:
    return x, None


def _materialize_cotangent_bwd(_: None, g: Array) -> tuple[Array]:
    return (jax.lax.optimization_barrier(g),)


materialize_cotangent.defvjp(_materialize_cotangent_fwd, _materialize_cotangent_bwd)


class LayerNorm(nn.Module):
    """`nn.LayerNorm` over the last axis (same parameters `scale`/`bias`, same forward) with the
    compact backward of `layer_norm`: ~1/6 of the bytes kept per normalized activation in
    bfloat16 training."""

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, scale, bias)
        return layer_norm(x, scale, bias, self.epsilon).astype(dtype)


# `model.remat_policy`: what a rematerialized block keeps for the backward pass besides its
# inputs (`jax.checkpoint` policies; the values not kept are recomputed).
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,  # nothing: the whole block's forward runs again (least memory)
    # the outputs of matmuls without batch dims: the q/k/v, output and MLP projections; the
    # attention scores (batched einsums), convolutions, norms and activations are recomputed
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.checkpoint_dots,  # every matmul, attention's included
}


def remat_policy(remat: bool | str) -> Callable[..., bool] | None:
    """The `jax.checkpoint` policy of a `remat` setting: True means 'full'."""
    name = "full" if remat is True else remat
    if name not in REMAT_POLICIES:
        raise ValueError(f"model.remat_policy must be one of {sorted(REMAT_POLICIES)}, "
                         f"got {name!r}")
    return REMAT_POLICIES[name]


@functools.cache  # one wrapped class per (class, setting): modules may ask for it per block
def maybe_remat(module_cls: type[nn.Module], remat: bool | str,
                static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
    """`nn.remat(module_cls)` under `remat`'s policy (True = 'full', a name of
    `REMAT_POLICIES`: `model.remat` with `model.remat_policy`), else (False) the class itself.

    `static_argnums` count `self` as 0 (as `nn.remat` does): mark the Python-bool flags
    (`deterministic` / `train`) static, passing them positionally. The parameter tree is the same
    either way.
    """
    if remat is False:
        return module_cls
    return nn.remat(module_cls, static_argnums=static_argnums, policy=remat_policy(remat))


def padding_mask_to_attention_mask(key_mask: Array) -> Array:
    """(B, Lk) {0,1} padding mask -> (B, 1, 1, Lk) boolean attention mask."""
    return key_mask.astype(bool)[:, None, None, :]


ATTENTION_IMPLS = ("einsum", "xla", "cudnn")


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
    implementation: str = "einsum",
    softmax: str = "deferred",
) -> Array:
    """softmax(q kᵀ / √d + bias, masked) v.

    q: (..., Lq, H, D), k/v: (..., Lk, H, D) -> (..., Lq, H, D). Softmax runs in float32.
    A query row whose keys are all masked gets uniform weights (as HF's additive mask does).

    `implementation`: 'einsum' (the default: this function's own two head-major batched
    matmuls, `attend_head_major`; `softmax` says where its division goes), or
    `jax.nn.dot_product_attention` with 'xla' (its XLA implementation) or 'cudnn' (cuDNN's fused
    flash attention: GPU, float16 / bfloat16, no attention dropout); see `fused_attention`.
    """
    if implementation != "einsum":
        if implementation not in ATTENTION_IMPLS:
            raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, "
                             f"got {implementation!r}")
        if not deterministic and dropout_rate > 0.0:
            raise ValueError(f"attention implementation {implementation!r} has no attention "
                             "dropout; use 'einsum' or dropout_rate=0")
        return fused_attention(q, k, v, bias=bias, mask=mask, implementation=implementation,
                               dtype=dtype)
    # Head-major operands, so both products are plain batched GEMMs: (..., H, Lq, D)·(..., H, D,
    # Lk) and (..., H, Lq, Lk)·(..., H, Lk, D). Einsums over the (..., L, H, D) layout left the
    # layout to XLA:CPU, whose choice made Swin-B's stage-1 window attention 3× slower
    # (benchmarks/README.md).
    qh, kh, vh = (jnp.swapaxes(t, -2, -3) for t in (q, k, v))
    out = attend_head_major(qh, kh, vh, bias=bias, mask=mask, dropout_rate=dropout_rate,
                            dropout_rng=dropout_rng, deterministic=deterministic, dtype=dtype,
                            softmax=softmax)
    return jnp.swapaxes(out, -2, -3)


SOFTMAX_MODES = ("deferred", "normalized", "compact")


def check_softmax(softmax: str) -> str:
    """`softmax` if it names a form of the einsum attention's softmax, else a ValueError.

    'deferred' (the default) divides the (Lq, D) value product by the row sums instead of the
    (Lq, Lk) weights (`attention_weights`): Swin-B's window attention −40% on XLA:CPU
    (benchmarks/README.md).
    'normalized' is the textbook softmax. On XLA:GPU neither becomes one kernel: both write
    float32 exp(·) and read it back (a deviceless compile of the paper model's train step for
    the H200, `benchmarks.gpu_aot`: 'normalized' launches 48 more kernels, needs 0.5 GiB less).
    'compact' is the textbook softmax rounded to the compute dtype, whose backward works from
    those rounded weights (`softmax_rounded`): no float32 copy of the weights is written or
    kept; the same function in float32.
    """
    if softmax not in SOFTMAX_MODES:
        raise ValueError(f"attention softmax must be one of {SOFTMAX_MODES}, got {softmax!r}")
    return softmax


def attend_head_major(
    qh: Array,  # (..., H, Lq, D)
    kh: Array,  # (..., H, Lk, D)
    vh: Array,  # (..., H, Lk, D)
    *,
    bias: Array | None = None,
    mask: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    deterministic: bool = True,
    dtype: Dtype | None = None,
    softmax: str = "deferred",
) -> Array:
    """`dot_product_attention`'s einsum implementation on head-major operands:
    -> (..., H, Lq, D). `softmax`: see `check_softmax`."""
    dtype = dtype or qh.dtype
    qh = qh / jnp.sqrt(jnp.asarray(qh.shape[-1], dtype=qh.dtype))
    logits = matmul(qh, jnp.swapaxes(kh, -1, -2))  # (..., H, Lq, Lk)
    weights, total = attention_weights(
        logits, bias=bias, mask=mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        deterministic=deterministic, dtype=dtype, softmax=softmax)
    out = matmul(weights, vh.astype(dtype))  # (..., H, Lq, D)
    return out.astype(dtype) if total is None else (out / total).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_rounded(logits: Array, dtype: Any) -> Array:
    """softmax(logits) over the last axis, rounded to `dtype`; its backward computes
    p ⊙ (g − Σ g ⊙ p) in float32 from those rounded p, so only they are kept (in bfloat16: half
    the bytes of jax.nn.softmax's float32 output, which the backward would keep). In float32 it
    is jax.nn.softmax up to float32 rounding.

    Written as exp(x − logsumexp(x)): the float32 exp(x − max) feeds only the row sums, so XLA
    keeps it inside the reduction, and the weights come from one elementwise pass that writes
    `dtype` (the paper model's bfloat16 train step, compiled for an H200: 173.1 GB of kernel I/O
    against 191.2 GB written as jax.nn.softmax(x).astype(dtype); benchmarks/README.md)."""
    top = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True))
    return jnp.exp(logits - lse).astype(dtype)


def _softmax_rounded_fwd(logits: Array, dtype: Any) -> tuple[Array, Array]:
    p = softmax_rounded(logits, dtype)
    return p, p


def _softmax_rounded_bwd(dtype: Any, p: Array, g: Array) -> tuple[Array]:
    del dtype
    p, g = p.astype(jnp.float32), g.astype(jnp.float32)
    return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


softmax_rounded.defvjp(_softmax_rounded_fwd, _softmax_rounded_bwd)


def attention_weights(
    logits: Array,  # (..., H, Lq, Lk), already scaled by 1/√d
    *,
    bias: Array | None = None,
    mask: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    deterministic: bool = True,
    dtype: Dtype = jnp.float32,
    softmax: str = "deferred",
) -> tuple[Array, Array | None]:
    """The softmax of (logits + bias, masked) before its division, in float32:
    (E = exp(logits − row max) after attention dropout, cast to `dtype`; Σ_k E before dropout,
    (..., H, Lq, 1), float32). softmax·V = (E·V) / Σ: dividing the (Lq, D) product instead of
    the (Lq, Lk) weights saves a pass over them (Swin-B's window attention: −40%,
    benchmarks/README.md).
    `softmax` 'normalized': (softmax after attention dropout, cast to `dtype`; None) instead;
    'compact': the same with `softmax_rounded` (its backward from the `dtype` weights)."""
    logits = logits.astype(jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, _MASK_VALUE)
    softmax = check_softmax(softmax)
    if softmax == "compact":
        weights, total = softmax_rounded(logits, jnp.dtype(dtype)), None
    elif softmax == "normalized":
        weights, total = jax.nn.softmax(logits, axis=-1), None
    else:
        weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
        total = weights.sum(-1, keepdims=True)
    if not deterministic and dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("dropout_rng is required when dropout is active")
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    return weights.astype(dtype), total


KV_PROJECTIONS = ("auto", "before", "after")


def projects_kv_after(kv_projection: str, lq: int, lk: int, kv_dim: int, features: int,
                      heads: int) -> bool:
    """Whether `MultiHeadAttention` folds the key/value projections into the query and the
    attended inputs (`kv_projection='after'`) instead of projecting every key/value token
    ('before'). 'auto': whichever does fewer multiply-adds per batch element,
    before: 2·Lk·C_kv·F (K, V) + 2·H·Lq·Lk·d (scores, values), after: 2·Lq·C_kv·F + 2·H·Lq·Lk·C_kv.
    A few queries over many keys gain: 21 words over 3600 vision tokens of width 256, 3.3× fewer.
    """
    if kv_projection not in KV_PROJECTIONS:
        raise ValueError(f"kv_projection must be one of {KV_PROJECTIONS}, got {kv_projection!r}")
    if kv_projection != "auto":
        return kv_projection == "after"
    before = lk * kv_dim * features + heads * lq * lk * (features // heads)
    after = lq * kv_dim * features + heads * lq * lk * kv_dim
    return after < before


def fused_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    bias: Array | None = None,
    mask: Array | None = None,
    implementation: str = "xla",
    dtype: Dtype | None = None,
) -> Array:
    """`dot_product_attention` through `jax.nn.dot_product_attention`, which takes (B, L, N, D).

    Leading dims after the first, e.g. Swin's windows in (B, nW, T, H, D), fold into the head
    axis N, so a bias that broadcasts over the batch, like Swin's (nW, H, T, T) relative-position
    bias + shift mask, stays (1, nW·H, T, T) instead of being copied for every image.
    """
    dtype = dtype or q.dtype
    if implementation == "cudnn" and target_backend() != "gpu":
        raise ValueError("attention implementation 'cudnn' needs a GPU backend "
                         f"(this one is {target_backend()!r}); use 'einsum' or 'xla'")
    *lead, lq, heads, depth = q.shape
    batch = lead[0] if lead else 1
    groups = int(np.prod(lead[1:], dtype=np.int64))  # folded into the heads

    def fold(t: Array) -> Array:  # (B, *G, L, H, D) -> (B, L, G·H, D)
        t = t.astype(dtype).reshape(batch, groups, t.shape[-3], heads, depth)
        return t.transpose(0, 2, 1, 3, 4).reshape(batch, t.shape[2], groups * heads, depth)

    def fold_logits(x: Array) -> Array:  # ~(B, *G, H, Lq, Lk) -> (B|1, G·H, Lq, Lk)
        x = jnp.asarray(x)
        x = x.reshape((1,) * (len(lead) + 3 - x.ndim) + x.shape)
        b = x.shape[0] if lead else 1
        x = jnp.broadcast_to(x, (b, *lead[1:], heads, *x.shape[-2:]))
        return x.reshape(b, groups * heads, *x.shape[-2:])

    out = jax.nn.dot_product_attention(
        fold(q), fold(k), fold(v),
        bias=None if bias is None else fold_logits(bias).astype(dtype),
        mask=None if mask is None else fold_logits(mask.astype(bool)),
        implementation=implementation,
    )  # (B, Lq, G·H, D)
    out = out.reshape(batch, lq, groups, heads, depth).transpose(0, 2, 1, 3, 4)
    return out.reshape(*lead, lq, heads, depth) if lead else out.reshape(lq, heads, depth)


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
    implementation: str = "einsum"  # dot_product_attention's: einsum | xla | cudnn
    # 'before': project keys and values, then attend; 'after': attend over the unprojected
    # key/value inputs and project afterwards (einsum implementation, no regroup); 'auto':
    # the one with fewer multiply-adds (`projects_kv_after`). The same function either way.
    kv_projection: str = "auto"
    # 'deferred' | 'normalized' | 'compact': the einsum implementation's softmax form
    # (`check_softmax`).
    softmax: str = "deferred"
    # Self-attention with `kv_projection` 'before': 'fused' = one (C, 3F) projection through the
    # concatenated query/key/value kernels (the parameters stay three `nn.Dense`s) and one
    # `regroup` and head-major transpose; 'separate' = three of each; 'auto' = 'separate' on a
    # CPU backend (fused: Swin-B at 480 +7% on XLA:CPU), else 'fused' (paper model's train step
    # on XLA:GPU: 440 fewer kernels, `benchmarks.gpu_aot`).
    qkv_projection: str = "auto"

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,  # (..., Lq, Cq)
        inputs_kv: Array | None = None,  # (..., Lk, Ck)
        *,
        mask: Array | None = None,  # bool, broadcastable to (..., H, Lq, Lk)
        bias: Array | None = None,  # broadcastable to (..., H, Lq, Lk)
        deterministic: bool = True,
        regroup: Callable[[Array, Array], Array] | None = None,
        ungroup: Callable[[Array], Array] | None = None,
    ) -> Array:
        """Attend from `inputs_q` to `inputs_kv` (default: itself).

        `regroup(t, fill)`, if given, maps each projected query/key/value tensor to the layout
        attention runs in; `fill` (C,) is what a zero input token projects to (the bias), the
        value of any zero-padding token it inserts. `ungroup` maps the attended values back
        before the output projection. Projections are per token, so projecting first and
        padding / regrouping afterwards equals regrouping the inputs, without projecting the
        padding (Swin's window attention: stage 3 at 480 projects 900 tokens instead of 1296).
        """
        if inputs_kv is None:
            inputs_kv = inputs_q
        features = self.qkv_features or inputs_q.shape[-1]
        if features % self.num_heads:
            raise ValueError(f"qkv_features {features} not divisible by num_heads {self.num_heads}")
        head_dim = features // self.num_heads
        dense = functools.partial(
            Dense,
            features,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
        )

        def split(x: Array) -> Array:
            return x.reshape(*x.shape[:-1], self.num_heads, head_dim)

        dropout_rng = None
        if not deterministic and self.dropout_rate > 0.0:
            dropout_rng = self.make_rng("dropout")
        attention = dict(bias=bias, mask=mask, dropout_rate=self.dropout_rate,
                         dropout_rng=dropout_rng, deterministic=deterministic)
        softmax = check_softmax(self.softmax)
        after = projects_kv_after(self.kv_projection, inputs_q.shape[-2], inputs_kv.shape[-2],
                                  inputs_kv.shape[-1], features, self.num_heads)
        if after and regroup is None and self.implementation == "einsum":
            q = split(dense(name="query")(inputs_q))
            out = self._attend_then_project(q, inputs_kv, dense(name="key"), dense(name="value"),
                                            **attention)
        elif inputs_kv is inputs_q and resolve_qkv_projection(self.qkv_projection) == "fused":
            projs = [dense(name=name) for name in ("query", "key", "value")]
            t, fill = _fused_projection(projs, inputs_q, self.dtype)  # (..., L, 3·features)
            if regroup is not None:
                t = regroup(t, fill)
            t = t.reshape(*t.shape[:-1], 3, self.num_heads, head_dim)  # (..., L, 3, H, d)
            if self.implementation == "einsum":  # one transpose to head-major for q, k and v
                t = jnp.moveaxis(t, (-4, -3), (-2, 0))  # (3, ..., H, L, d)
                out = jnp.swapaxes(attend_head_major(t[0], t[1], t[2], **attention,
                                                     dtype=self.dtype, softmax=softmax), -2, -3)
            else:
                out = dot_product_attention(t[..., 0, :, :], t[..., 1, :, :], t[..., 2, :, :],
                                            **attention, dtype=self.dtype,
                                            implementation=self.implementation)
        else:
            projected = []
            for name, inputs in (("query", inputs_q), ("key", inputs_kv), ("value", inputs_kv)):
                proj = dense(name=name)
                t = proj(inputs)  # (..., L, features)
                if regroup is not None:
                    fill = (proj.variables["params"]["bias"].astype(t.dtype) if self.use_bias
                            else jnp.zeros((features,), t.dtype))
                    t = regroup(t, fill)
                projected.append(split(t))
            out = dot_product_attention(*projected, **attention, dtype=self.dtype,
                                        implementation=self.implementation, softmax=softmax)
        out = out.reshape(*out.shape[:-2], features)
        if ungroup is not None:
            out = ungroup(out)
        if self.use_output_proj:
            out = Dense(
                self.out_features or inputs_q.shape[-1],
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=self.kernel_init,
                bias_init=self.bias_init,
                name="out",
            )(out)
        return out

    def _attend_then_project(self, q: Array, x: Array, key: nn.Dense, value: nn.Dense,
                             **attention: Any) -> Array:
        """Attention with the key/value projections moved past it (exact algebra):
        q·(x W_k + b_k)ᵀ = (q W_kᵀ)·xᵀ + q·b_k, whose last term is the same for every key and
        cancels in the softmax; P (x W_v + b_v) = (P x) W_v + (Σ_k P) b_v.
        q (..., Lq, H, d), x (..., Lk, C_kv) → (..., Lq, H, d); `attention`: `attention_weights`'
        bias, mask and dropout arguments."""
        heads, depth = q.shape[-2:]
        dtype = self.dtype
        x = x.astype(dtype)
        (wk, _), (wv, bv) = (_dense_params(p, x.shape[-1], dtype) for p in (key, value))
        wk, wv = (w.astype(dtype).reshape(-1, heads, depth) for w in (wk, wv))  # (C_kv, H, d)
        q = q.astype(dtype) / jnp.sqrt(jnp.asarray(depth, dtype))
        qk = einsum("...qhd,chd->...qhc", q, wk)  # (..., Lq, H, C_kv)
        logits = einsum("...qhc,...kc->...hqk", qk, x)  # (..., H, Lq, Lk)
        weights, total = attention_weights(logits, dtype=dtype, **attention)
        px = einsum("...hqk,...kc->...qhc", weights, x)  # (..., Lq, H, C_kv)
        total = jnp.swapaxes(total, -2, -3)  # (..., Lq, H, 1)
        out = einsum("...qhc,chd->...qhd", (px / total).astype(dtype), wv)
        if bv is None:
            return out
        bv = bv.astype(dtype).reshape(heads, depth)
        if attention["dropout_rng"] is None:  # no dropout: the softmax rows sum to 1
            return out + bv
        rows = jnp.swapaxes(weights.sum(-1, keepdims=True), -2, -3) / total  # Σ_k P
        return out + (rows * bv).astype(dtype)


def _dense_params(proj: nn.Dense, in_features: int, dtype: Dtype) -> tuple[Array, Array | None]:
    """(kernel, bias or None) of a `nn.Dense` submodule that need not have been called: at init
    a call on zero rows creates its parameters (the same ones, from the same RNG stream)."""
    if not proj.has_variable("params", "kernel"):
        proj(jnp.zeros((0, in_features), dtype))
    params = proj.variables["params"]
    return params["kernel"], params.get("bias")


QKV_PROJECTIONS = ("auto", "fused", "separate")


def resolve_qkv_projection(qkv_projection: str) -> str:
    """'fused' or 'separate' for a `MultiHeadAttention.qkv_projection` setting."""
    if qkv_projection not in QKV_PROJECTIONS:
        raise ValueError(
            f"qkv_projection must be one of {QKV_PROJECTIONS}, got {qkv_projection!r}")
    if qkv_projection == "auto":
        return "separate" if target_backend() == "cpu" else "fused"
    return qkv_projection


def _fused_projection(projs: Sequence[nn.Dense], x: Array, dtype: Dtype) -> tuple[Array, Array]:
    """x·[W_1 | W_2 | ...] + [b_1 | b_2 | ...]: several `nn.Dense` projections of one input as
    one GEMM, (..., C) -> (..., ΣF), with the concatenated bias (zeros without biases), which is
    also what a zero input token projects to. Each output column is the same dot product the
    separate `nn.Dense` computes."""
    params = [_dense_params(p, x.shape[-1], dtype) for p in projs]
    kernel = jnp.concatenate([w.astype(dtype) for w, _ in params], axis=-1)  # (C, ΣF)
    bias = jnp.concatenate([jnp.zeros((w.shape[-1],), dtype) if b is None else b.astype(dtype)
                            for w, b in params])  # (ΣF,)
    y = dot_general(x.astype(dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return y + bias, bias


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
        lead = x.shape[:-1]
        # Tokens as one (N, C) matrix: XLA:CPU runs the GEMM + GELU ~2% faster (full VIPA
        # forward) than on (B, H, W, C); the result is bit-identical.
        x = x.reshape(-1, x.shape[-1])
        dense = functools.partial(
            Dense, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init
        )
        x = exact_gelu(dense(self.hidden_features, name=self.names[0])(x))
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        x = dense(out, name=self.names[1])(x)
        return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic).reshape(*lead, out)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample (rng stream 'dropout')."""

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True,
                 rate: float | Array | None = None) -> Array:
        """`rate`, when given, replaces the attribute (a traced rate: blocks run by a scan)."""
        rate = self.rate if rate is None else rate
        if deterministic or isinstance(rate, float | int) and rate == 0.0:
            return x
        keep = 1.0 - rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


def _align_corners_coords(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weight of i1 for align_corners=True, as PyTorch computes them."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"resize sizes must be >= 1, got in={n_in}, out={n_out}")
    # PyTorch (UpSample.h, area_pixel_compute_scale/source_index): scale = (in-1)/(out-1) in
    # float32, src = scale * dst; i0 = floor(src); i1 = min(i0 + 1, in - 1); w1 = src - i0.
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0.0)
    src = (scale * np.arange(n_out, dtype=np.float32)).astype(np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, w1


def resize_bilinear_align_corners(
    x: Any, size: Sequence[int], axes: tuple[int, int] = (-2, -1)
) -> Any:
    """Bilinear resize with align_corners=True (PyTorch ``F.interpolate`` semantics), no antialias.

    x: (..., h, w) by default, or any layout with the two spatial ``axes`` given (e.g. (1, 2) for
    NHWC features) -> same layout with the spatial dims replaced by ``size`` = (H, W).
    Computed in float32; floating inputs are returned in their own dtype, integer/bool inputs as
    float32. NumPy in -> NumPy out (host path); anything else goes through jax.numpy (jit-able).
    """
    if len(size) != 2:
        raise ValueError(f"size must be (H, W), got {size!r}")
    xp = np if isinstance(x, np.ndarray) else jnp
    ndim = x.ndim
    ax = tuple(a % ndim for a in axes)
    if ndim < 2 or len(set(ax)) != 2:
        raise ValueError(f"need two distinct spatial axes, got axes={axes} for ndim={ndim}")
    out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else np.float32
    y = x.astype(xp.float32)
    for a, n_out in zip(ax, size, strict=True):
        n_in = y.shape[a]
        if n_in == n_out:
            continue
        i0, i1, w1 = _align_corners_coords(n_in, int(n_out))
        # (out, in) interpolation matrix: a matmul, whose gradient is a matmul too (a gather's
        # is a scatter-add, several times slower on CPU); exact in float32 (HIGHEST precision).
        interp = np.zeros((int(n_out), n_in), np.float32)
        np.add.at(interp, (np.arange(int(n_out)), i0), np.float32(1.0) - w1)
        np.add.at(interp, (np.arange(int(n_out)), i1), w1)
        if xp is np:
            y = np.moveaxis(np.tensordot(interp, np.moveaxis(y, a, 0), axes=1), 0, a)
        else:
            y = jnp.moveaxis(jnp.tensordot(interp, jnp.moveaxis(y, a, 0), axes=1,
                                           precision=jax.lax.Precision.HIGHEST), 0, a)
    return y.astype(out_dtype)


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
        return LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x + y)


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
        return LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x + y)
