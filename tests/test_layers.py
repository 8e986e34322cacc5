"""Building blocks: custom-gradient GELU / LayerNorm (same forward as flax/jax, less kept for the
backward pass) and the attention implementations."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.common import saved_residual_bytes
from vipa_jax.models.layers import (
    LayerNorm,
    cpu_fusion_barrier,
    dot_product_attention,
    exact_gelu,
    materialize_cotangent,
)


def test_exact_gelu_forward_gradients_and_residuals() -> None:
    x = jnp.linspace(-8.0, 8.0, 4001, dtype=jnp.float32)
    ref = lambda v: nn.gelu(v, approximate=False)  # noqa: E731
    # PyTorch's expression x·(1 + erf(x/√2))/2: float32 rounding away from float64's value, as
    # flax's erfc form (which is 2.5× slower on XLA:CPU)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in np.asarray(x, float)])
    np.testing.assert_allclose(exact_gelu(x), exact, rtol=0, atol=1e-6)
    np.testing.assert_allclose(exact_gelu(x), ref(x), rtol=0, atol=1e-6)
    g_ref, g = jax.vmap(jax.grad(ref))(x), jax.vmap(jax.grad(exact_gelu))(x)
    np.testing.assert_allclose(g, g_ref, atol=3e-7)
    # Φ(x) + x φ(x) at 1: 0.8413447 + 0.2419707
    assert float(jax.grad(exact_gelu)(1.0)) == pytest.approx(1.0833155, abs=1e-6)
    assert float(jax.grad(jax.grad(exact_gelu))(1.0)) == pytest.approx(
        float(jax.grad(jax.grad(ref))(1.0)), abs=1e-6)
    # bfloat16: the derivative is computed in float32, so it is closer to the float32 one
    xb = x.astype(jnp.bfloat16)
    err = jnp.abs(jax.vmap(jax.grad(exact_gelu))(xb).astype(jnp.float32) - g_ref).max()
    err_ref = jnp.abs(jax.vmap(jax.grad(ref))(xb).astype(jnp.float32) - g_ref).max()
    assert float(err) <= float(err_ref)
    # one array of x's size is kept for the backward pass (autodiff through erfc keeps four)
    h = jnp.ones((64, 256), jnp.bfloat16)
    assert saved_residual_bytes(lambda v: exact_gelu(v).astype(jnp.float32).sum(), h) == h.size * 2
    assert saved_residual_bytes(lambda v: ref(v).astype(jnp.float32).sum(), h) >= 3 * h.size * 2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_matches_flax(dtype: jnp.dtype) -> None:
    x = (jax.random.normal(jax.random.key(0), (4, 7, 96)) * 3 + 1).astype(dtype)
    ref, ours = nn.LayerNorm(1e-5, dtype=dtype), LayerNorm(1e-5, dtype=dtype)
    v = ref.init(jax.random.key(1), x)
    v = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), v)
    assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(v)
    out = ours.apply(v, x)
    assert out.dtype == dtype and bool((out == ref.apply(v, x)).all())  # bit-identical forward
    w = jax.random.normal(jax.random.key(3), x.shape)

    def grads(m: nn.Module) -> tuple:
        return jax.grad(lambda v, x: (m.apply(v, x).astype(jnp.float32) * w).sum(),
                        argnums=(0, 1))(v, x)

    (gv_ref, gx_ref), (gv, gx) = grads(ref), grads(ours)
    for k in ("scale", "bias"):
        np.testing.assert_allclose(gv["params"][k], gv_ref["params"][k], rtol=1e-5, atol=1e-4)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2  # bfloat16: one ulp of dx ~ 1
    np.testing.assert_allclose(gx.astype(jnp.float32), gx_ref.astype(jnp.float32), atol=tol)
    # kept for the backward: x in its dtype + mean and 1/σ per token (+ the scale, a constant
    # here), not three float32 copies of x
    def kept(m: nn.Module) -> int:
        return saved_residual_bytes(lambda x: m.apply(v, x * 2).astype(jnp.float32).sum(), x)

    assert kept(ours) <= x.size * x.dtype.itemsize + 1024
    assert kept(ref) >= 3 * x.size * 4


def test_materialize_cotangent_is_the_identity_with_a_barrier_in_the_backward() -> None:
    """Forward and gradient of the identity; the gradient's program has the barrier that keeps
    XLA from fusing the cotangent's producer (a sum over windows) into its consumer."""
    table = jax.random.normal(jax.random.key(0), (4, 9, 9))
    w = jax.random.normal(jax.random.key(1), (6, 4, 9, 9))

    def loss(t: jax.Array, barrier: bool) -> jax.Array:
        b = materialize_cotangent(t) if barrier else t
        return jnp.sum(jnp.tanh(w + b[None]) ** 2)  # b's cotangent: a sum over the 6 rows

    np.testing.assert_array_equal(materialize_cotangent(table), table)
    g0, g1 = (jax.grad(loss)(table, b) for b in (False, True))
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(g0))
    text = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(table, True))
    assert text.count("optimization_barrier") == 1
    assert "optimization_barrier" not in str(jax.make_jaxpr(loss, static_argnums=1)(table, True))


def test_cpu_fusion_barrier_is_exact_and_stops_chain_duplication(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The identity (bit for bit on finite values and -0; gradients within rounding), and on
    XLA:CPU it keeps a residual stream of LayerNorms from being recomputed inside every later
    layer's kernels: the gradient program of 8 layers is several times smaller with it."""
    from vipa_jax.models import layers

    x = jax.random.normal(jax.random.key(0), (3, 5, 16)) * 4
    np.testing.assert_array_equal(np.asarray(jax.jit(cpu_fusion_barrier)(x)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(cpu_fusion_barrier(-0.0 * x)), -0.0 * np.asarray(x))

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, h: jax.Array) -> jax.Array:
            for _ in range(8):
                h = LayerNorm()(h + nn.Dense(h.shape[-1])(h))
            return h

    m, h = Stack(), jnp.ones((2, 8, 32)) * jnp.arange(32.0)
    v = m.init(jax.random.key(1), h)

    def grad_and_hlo_lines() -> tuple[jax.Array, int]:
        fn = jax.jit(jax.grad(lambda v: (m.apply(v, h) ** 2).sum()))
        return fn(v), fn.lower(v).compile().as_text().count("\n")

    g, lines = grad_and_hlo_lines()
    monkeypatch.setattr(layers, "cpu_fusion_barrier", lambda y: y)
    g_ref, lines_ref = grad_and_hlo_lines()
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # measured 2269 against 14771 lines (jax 0.10.2, XLA:CPU)
    assert lines * 3 < lines_ref, (lines, lines_ref)


def test_layer_norm_constant_rows_and_default_dtype() -> None:
    x = jnp.ones((2, 8))
    out, v = LayerNorm().init_with_output(jax.random.key(0), x)
    assert out.dtype == jnp.float32 and bool((out == 0).all())
    gx = jax.grad(lambda x: LayerNorm().apply(v, x).sum())(x)
    assert bool(jnp.isfinite(gx).all()) and bool((gx == 0).all())


def _attention_inputs(lead: tuple[int, ...], lq: int, lk: int, heads: int = 2, depth: int = 8,
                      seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kq, (*lead, lq, heads, depth)),
            jax.random.normal(kk, (*lead, lk, heads, depth)),
            jax.random.normal(kv, (*lead, lk, heads, depth)))


@pytest.mark.parametrize("case", ["swin_windows", "padding_mask", "cross", "unbatched"])
def test_fused_attention_matches_einsum(case: str) -> None:
    """jax.nn.dot_product_attention (XLA) through `fused_attention`'s folding = our einsums, with
    Swin's (nW, H, T, T) bias over (B, nW, T, H, D), a (B, 1, 1, Lk) padding mask, Lq != Lk,
    and no batch dims; gradients too."""

    kw: dict = {}
    if case == "swin_windows":
        q, k, v = _attention_inputs((3, 4), 16, 16)
        kw["bias"] = 3.0 * jax.random.normal(jax.random.PRNGKey(5), (4, 2, 16, 16))
    elif case == "padding_mask":
        q, k, v = _attention_inputs((3,), 7, 7)
        kw["mask"] = (jnp.arange(7)[None, :] < jnp.array([7, 4, 1])[:, None])[:, None, None, :]
    elif case == "cross":
        q, k, v = _attention_inputs((2,), 5, 9)
        kw["bias"] = jax.random.normal(jax.random.PRNGKey(6), (2, 1, 5, 9))
        keep = jax.random.bernoulli(jax.random.PRNGKey(7), 0.7, (2, 1, 5, 9))
        kw["mask"] = keep.at[..., 0].set(True)
    else:
        q, k, v = _attention_inputs((), 6, 6)

    def loss(impl: str, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        out = dot_product_attention(q, k, v, implementation=impl, **kw)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out

    (_, ref), g_ref = jax.value_and_grad(functools.partial(loss, "einsum"), (0, 1, 2),
                                         has_aux=True)(q, k, v)
    (_, out), g = jax.value_and_grad(functools.partial(loss, "xla"), (0, 1, 2),
                                     has_aux=True)(q, k, v)
    assert out.shape == ref.shape == q.shape
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=2e-5)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-4)
    # the bias / mask matter here (else this test would not see a wrong folding)
    if kw:
        plain = dot_product_attention(q, k, v, implementation="xla")
        assert float(jnp.abs(plain - ref).max()) > 0.1


def test_fused_attention_errors() -> None:

    q, k, v = _attention_inputs((1,), 4, 4)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="'cudnn' needs a GPU backend"):
            dot_product_attention(q, k, v, implementation="cudnn")
    with pytest.raises(ValueError, match="no attention dropout"):
        dot_product_attention(q, k, v, implementation="xla", dropout_rate=0.1,
                              dropout_rng=jax.random.PRNGKey(0), deterministic=False)
    with pytest.raises(ValueError, match="must be one of"):
        dot_product_attention(q, k, v, implementation="flash")


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_kv_projection_after_attention_is_the_same_function(dropout: float) -> None:
    """`kv_projection='after'` (the key/value projections folded into the query and the attended
    inputs) gives the same init, outputs and parameter gradients as projecting every key/value
    token first, with a key mask, an additive bias and attention dropout."""
    from vipa_jax.models.layers import MultiHeadAttention

    rng = np.random.default_rng(0)
    xq = jnp.asarray(rng.standard_normal((2, 5, 24)), jnp.float32)  # 5 words of width 24
    xkv = jnp.asarray(rng.standard_normal((2, 40, 12)), jnp.float32)  # 40 vision tokens
    mask = jnp.asarray(rng.random((2, 1, 1, 40)) < 0.8).at[..., 0].set(True)
    bias = jnp.asarray(rng.standard_normal((2, 4, 5, 40)), jnp.float32)
    mods = {kv: MultiHeadAttention(4, use_output_proj=False, dropout_rate=dropout,
                                   kv_projection=kv) for kv in ("before", "after")}
    init = {kv: m.init(jax.random.key(0), xq, xkv) for kv, m in mods.items()}
    jax.tree.map(np.testing.assert_array_equal, init["after"], init["before"])
    # non-zero biases so that b_k's cancellation and b_v's row sums are exercised
    params = jax.tree.map(lambda p: p + 0.1 * jnp.cos(jnp.arange(p.size).reshape(p.shape)),
                          init["before"]["params"])

    def loss(kv: str, p: dict) -> tuple[jax.Array, jax.Array]:
        out = mods[kv].apply({"params": p}, xq, xkv, mask=mask, bias=bias,
                             deterministic=dropout == 0.0, rngs={"dropout": jax.random.key(3)})
        return jnp.sum(out * jnp.sin(jnp.arange(out.size).reshape(out.shape))), out

    (_, ref), g_ref = jax.value_and_grad(functools.partial(loss, "before"), has_aux=True)(params)
    (_, out), g = jax.value_and_grad(functools.partial(loss, "after"), has_aux=True)(params)
    assert out.shape == (2, 5, 24)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    for path in (("query", "kernel"), ("key", "kernel"), ("value", "kernel"), ("value", "bias")):
        a, b = g[path[0]][path[1]], g_ref[path[0]][path[1]]
        assert float(jnp.abs(b).max()) > 1e-2, path
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=str(path))
    # the key bias cancels in the softmax: no gradient either way
    assert float(jnp.abs(g["key"]["bias"]).max()) == 0.0
    assert float(jnp.abs(g_ref["key"]["bias"]).max()) < 1e-5


def test_kv_projection_auto_policy() -> None:
    """'auto' moves the projections past the attention only where that does fewer multiply-adds:
    21 words over the 3600 width-256 tokens of the language stage's cross-attention (3.3×
    fewer), not BERT's self-attention nor vision queries over words."""
    from vipa_jax.models.layers import projects_kv_after

    assert projects_kv_after("auto", 21, 3600, 256, 768, 12)
    assert projects_kv_after("auto", 21, 225, 1024, 768, 12)
    assert not projects_kv_after("auto", 21, 21, 768, 768, 12)  # self-attention
    assert not projects_kv_after("auto", 14400, 21, 768, 128, 4)  # vision over words
    assert projects_kv_after("after", 21, 21, 768, 768, 12)
    assert not projects_kv_after("before", 21, 3600, 256, 768, 12)
    with pytest.raises(ValueError, match="kv_projection must be one of"):
        projects_kv_after("later", 1, 1, 1, 1, 1)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_softmax_and_qkv_projection_forms_are_the_same_function(dropout: float) -> None:
    """Self-attention with the textbook softmax ('normalized') and / or one concatenated q/k/v
    GEMM ('fused') gives the deferred-division, separate-projection outputs and parameter
    gradients, with a key mask, an additive bias and attention dropout (the same keep mask)."""
    from vipa_jax.models.layers import MultiHeadAttention

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 3, 10, 16)), jnp.float32)  # (B, groups, L, C)
    mask = jnp.asarray(rng.random((2, 1, 1, 1, 10)) < 0.8).at[..., 0].set(True)
    bias = jnp.asarray(rng.standard_normal((3, 4, 10, 10)), jnp.float32)

    def module(softmax: str, qkv: str) -> MultiHeadAttention:
        return MultiHeadAttention(4, dropout_rate=dropout, softmax=softmax, qkv_projection=qkv)

    ref_mod = module("deferred", "separate")
    params = ref_mod.init(jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda p: p + 0.1 * jnp.cos(jnp.arange(p.size).reshape(p.shape)),
                          params)  # non-zero biases

    def grads(mod: MultiHeadAttention) -> tuple[jax.Array, dict]:
        def loss(p: dict) -> tuple[jax.Array, jax.Array]:
            out = mod.apply({"params": p}, x, mask=mask, bias=bias,
                            deterministic=dropout == 0.0, rngs={"dropout": jax.random.key(3)})
            return jnp.sum(out * jnp.sin(jnp.arange(out.size).reshape(out.shape))), out
        (_, out), g = jax.value_and_grad(loss, has_aux=True)(params)
        return out, g

    ref, g_ref = grads(ref_mod)
    for softmax, qkv in (("normalized", "separate"), ("deferred", "fused"),
                         ("normalized", "fused"), ("compact", "separate"), ("compact", "fused")):
        mod = module(softmax, qkv)
        jax.tree.map(np.testing.assert_array_equal, mod.init(jax.random.key(0), x)["params"],
                     ref_mod.init(jax.random.key(0), x)["params"])  # the same parameters
        out, g = grads(mod)
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5, err_msg=f"{softmax} {qkv}")
        for name in ("query", "key", "value", "out"):
            for leaf in ("kernel", "bias"):
                b = g_ref[name][leaf]
                if (name, leaf) == ("key", "bias"):  # cancels in the softmax: ~0 either way
                    assert float(jnp.abs(g[name][leaf]).max()) < 1e-5
                    continue
                assert float(jnp.abs(b).max()) > 1e-2, (name, leaf)
                np.testing.assert_allclose(g[name][leaf], b, atol=1e-4, rtol=1e-4,
                                           err_msg=f"{softmax} {qkv} {name}/{leaf}")


def test_softmax_rounded_keeps_only_the_rounded_weights() -> None:
    """`softmax_rounded` ('compact' attention softmax): in float32 jax.nn.softmax, value and
    gradient; in bfloat16 the rounded softmax, a gradient within bfloat16 rounding of the
    float32 one, and only the bfloat16 weights kept for the backward (jax.nn.softmax keeps its
    float32 output)."""
    from vipa_jax.models.layers import softmax_rounded

    rng = np.random.default_rng(0)
    x = jnp.asarray(3 * rng.standard_normal((4, 8, 144)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def grad(fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
        return jax.grad(lambda v: jnp.sum(fn(v).astype(jnp.float32) * ct))(x)

    ref = jax.nn.softmax(x, axis=-1)
    g_ref = grad(lambda v: jax.nn.softmax(v, axis=-1))
    assert float(jnp.abs(g_ref).max()) > 0.1
    np.testing.assert_allclose(softmax_rounded(x, jnp.float32), ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad(lambda v: softmax_rounded(v, jnp.float32)), g_ref,
                               rtol=1e-5, atol=1e-6)
    low = softmax_rounded(x, jnp.bfloat16)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_array_equal(low, ref.astype(jnp.bfloat16))
    g_low = grad(lambda v: softmax_rounded(v, jnp.bfloat16))
    scale = float(jnp.abs(g_ref).max())
    np.testing.assert_allclose(g_low, g_ref, atol=2e-2 * scale)
    assert float(jnp.abs(g_low - g_ref).max()) > 0  # it does use the rounded weights
    kept = saved_residual_bytes(
        lambda v: softmax_rounded(v, jnp.bfloat16).astype(jnp.float32).sum(), x)
    assert kept == x.size * 2
    assert saved_residual_bytes(
        lambda v: jax.nn.softmax(v, axis=-1).astype(jnp.bfloat16).astype(jnp.float32).sum(),
        x) >= x.size * 4


def test_softmax_and_qkv_projection_auto_policy() -> None:
    """'auto' keeps XLA:CPU's faster separate projections on a CPU backend; bad values name
    the setting."""
    from vipa_jax.models.layers import check_softmax, resolve_qkv_projection

    cpu = jax.default_backend() == "cpu"
    assert resolve_qkv_projection("auto") == ("separate" if cpu else "fused")
    assert check_softmax("normalized") == "normalized"
    assert resolve_qkv_projection("fused") == "fused"
    with pytest.raises(ValueError, match="attention softmax must be one of"):
        check_softmax("auto")
    with pytest.raises(ValueError, match="qkv_projection must be one of"):
        resolve_qkv_projection("packed")


def test_compiling_for_another_backend() -> None:
    """`compiling_for('gpu')` makes every `auto` choose the GPU's form while tracing on this
    machine (deviceless compiles, `benchmarks.gpu_aot`), nested blocks win, and leaving the
    block restores the default backend's choice."""
    from vipa_jax.backend import compiling_for, target_backend
    from vipa_jax.models.decoder import resolve_conv_impl
    from vipa_jax.models.layers import resolve_qkv_projection

    default = jax.default_backend()
    with compiling_for("gpu"):
        assert target_backend() == "gpu"
        assert resolve_qkv_projection("auto") == "fused"
        assert resolve_conv_impl("auto", jnp.float32) == "xla"
        with compiling_for("cpu"):
            assert resolve_qkv_projection("auto") == "separate"
            assert resolve_conv_impl("auto", jnp.float32) == "winograd"
        assert target_backend() == "gpu"
    assert target_backend() == default


def _dot_result_types(fn: Callable, *args) -> list:
    """The `preferred_element_type` of every dot_general in fn's jaxpr (None = the operands')."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return [e.params["preferred_element_type"] for e in jaxpr.eqns
            if e.primitive.name == "dot_general"]


def test_dot_results_float32_for_low_precision_products_only() -> None:
    """Under `dot_results('float32')` a bfloat16 product (Dense, einsum, matmul) asks XLA for
    float32 results and rounds them back: bfloat16 out, the same values as the bfloat16-result
    product up to the order of float32 accumulation, and the same gradients. 'native' leaves the
    product alone, float32 products are untouched either way, 'auto' is float32 on a CPU backend
    only, and a bad mode names the setting."""
    from vipa_jax.backend import compiling_for
    from vipa_jax.models.layers import Dense, dot_results, einsum, float32_dot_results, matmul

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 40, 96)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(96, 64)), jnp.bfloat16)
    dense = Dense(64, dtype=jnp.bfloat16)
    variables = dense.init(jax.random.key(0), x)

    def run(mode: str, fn: Callable, *args):
        def traced(*a):
            with dot_results(mode):
                return fn(*a)
        return traced(*args), _dot_result_types(traced, *args)

    forms = {
        "dense": (lambda v, x: dense.apply(v, x), variables, x),
        "einsum": (lambda x, w: einsum("bld,df->blf", x, w), x, w),
        "matmul": (lambda x, w: matmul(x, w), x, w),
    }
    for name, (fn, *args) in forms.items():
        native, native_types = run("native", fn, *args)
        wide, wide_types = run("float32", fn, *args)
        # (None or bfloat16: the operands' type; jnp.einsum and jnp.matmul name it)
        assert native_types in ([None], [jnp.bfloat16]) and wide_types == [jnp.float32], name
        assert wide.dtype == native.dtype == jnp.bfloat16, name
        ref = np.asarray(jnp.einsum("bld,df->blf", x.astype(jnp.float32), w.astype(jnp.float32)))
        scale = np.abs(ref).max()
        if name != "dense":  # (dense has its own kernel)
            # both are the float32 product rounded once to bfloat16 (≤ half a bf16 ulp, 2^-9)
            for out in (native, wide):
                np.testing.assert_allclose(np.asarray(out, np.float32), ref,
                                           atol=2 ** -8 * scale, rtol=2 ** -8)
        np.testing.assert_allclose(np.asarray(wide, np.float32), np.asarray(native, np.float32),
                                   atol=2 ** -7 * np.abs(np.asarray(native, np.float32)).max())
        # float32 operands: no change
        if name != "dense":
            f32_args = [a.astype(jnp.float32) for a in args]
            assert run("float32", fn, *f32_args)[1] == run("native", fn, *f32_args)[1], name
    f32_dense = (lambda v, x: Dense(64).apply(v, x), variables, x.astype(jnp.float32))
    assert run("float32", *f32_dense)[1] == run("native", *f32_dense)[1] == [None]

    # gradients: the same up to bfloat16 rounding
    def loss(mode: str):
        def f(x, w):
            with dot_results(mode):
                return jnp.sum(matmul(x, w).astype(jnp.float32) ** 2)
        return jax.grad(f, argnums=(0, 1))(x, w)

    for g_native, g_wide in zip(loss("native"), loss("float32"), strict=True):
        assert g_wide.dtype == jnp.bfloat16
        g_native, g_wide = np.asarray(g_native, np.float32), np.asarray(g_wide, np.float32)
        np.testing.assert_allclose(g_wide, g_native, atol=2 ** -6 * np.abs(g_native).max())

    with compiling_for("gpu"):
        assert not float32_dot_results()
        with dot_results("float32"):
            assert float32_dot_results()
    with compiling_for("cpu"):
        assert float32_dot_results()
        with dot_results("native"):
            assert not float32_dot_results()
    with pytest.raises(ValueError, match="model.dot_results must be one of"):
        with dot_results("bfloat16"):
            pass


def test_dense_transposed_kernel_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Dense` stores its kernel transposed in 'transposed_kernels' when that collection is
    mutable and `prefers_transposed_kernel` (few rows, enough weights, a CPU backend), never at
    init; applied with the cache it multiplies by the (F, C) kernel (the cache is what runs),
    with the uncached outputs, in float32 and in bfloat16 under float32 `dot_results` (that form
    also asks for float32 results, which XLA:CPU's GEMM library runs); a cache of another shape
    is an error naming the layer."""
    from vipa_jax.backend import compiling_for
    from vipa_jax.models import layers as L

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 5, 256)), jnp.float32)
    dense = L.Dense(512)
    variables = dense.init(jax.random.key(0), x)
    assert set(variables) == {"params"}  # init stores no cache
    kernel = variables["params"]["kernel"]
    out, cache = dense.apply(variables, x, mutable=[L.TRANSPOSED_KERNELS])
    np.testing.assert_array_equal(np.asarray(cache[L.TRANSPOSED_KERNELS]["kernel"]),
                                  np.asarray(kernel).T)
    cached = {**variables, **cache}

    def contracting(v, x):  # the rhs contracting dims of the jaxpr's one dot_general
        (eqn,) = [e for e in jax.make_jaxpr(lambda v, x: dense.apply(v, x))(v, x).jaxpr.eqns
                  if e.primitive.name == "dot_general"]
        return tuple(eqn.params["dimension_numbers"][0][1])

    assert (contracting(variables, x), contracting(cached, x)) == ((0,), (1,))
    want = dense.apply(variables, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(dense.apply)(cached, x)), np.asarray(want),
                               rtol=1e-5, atol=1e-5)
    zeros = {**variables, L.TRANSPOSED_KERNELS: {"kernel": jnp.zeros((512, 256))}}
    np.testing.assert_array_equal(np.asarray(dense.apply(zeros, x)),
                                  np.broadcast_to(np.asarray(variables["params"]["bias"]),
                                                  (1, 5, 512)))
    # bfloat16: the (M, K)·(N, K)ᵀ form asks for float32 results, and XLA:CPU runs it
    low = L.Dense(512, dtype=jnp.bfloat16)
    xb = x.astype(jnp.bfloat16)
    with L.dot_results("float32"):
        assert L.asks_float32_results(xb, kernel.T.astype(jnp.bfloat16), (((2,), (1,)), ((), ())))
        got = jax.jit(low.apply)(cached, xb)
        types = _dot_result_types(lambda v, x: low.apply(v, x), cached, xb)
    assert got.dtype == jnp.bfloat16 and types == [jnp.float32]
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want),
                               atol=2 ** -6 * float(jnp.abs(want).max()))
    stale = {**variables, L.TRANSPOSED_KERNELS: {"kernel": jnp.zeros((256, 512))}}
    with pytest.raises(ValueError, match=r"transposed_kernels/kernel has shape \(256, 512\)"):
        dense.apply(stale, x)
    # what is picked: rows, weights, backend
    assert L.prefers_transposed_kernel(128, 256, 256)
    assert not L.prefers_transposed_kernel(129, 768, 768)
    assert not L.prefers_transposed_kernel(21, 128, 256)
    with compiling_for("gpu"):
        assert not L.prefers_transposed_kernel(21, 768, 768)
        assert not dense.apply(variables, x, mutable=[L.TRANSPOSED_KERNELS])[1]
    many = jnp.zeros((2, 300, 256))  # 600 rows
    assert not dense.apply(variables, many, mutable=[L.TRANSPOSED_KERNELS])[1]
    monkeypatch.setattr(L, "TRANSPOSED_KERNEL_MAX_ROWS", 600)
    assert dense.apply(variables, many, mutable=[L.TRANSPOSED_KERNELS])[1]
    with pytest.raises(ValueError, match="layers.Dense computes its product"):
        L.Dense(512, dot_general=jax.lax.dot_general).init(jax.random.key(0), x)
