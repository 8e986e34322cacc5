"""Custom-gradient building blocks: same forward as flax/jax, less kept for the backward pass."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.common import saved_residual_bytes
from vipa_jax.models.layers import LayerNorm, exact_gelu


def test_exact_gelu_forward_gradients_and_residuals() -> None:
    x = jnp.linspace(-8.0, 8.0, 4001, dtype=jnp.float32)
    ref = lambda v: nn.gelu(v, approximate=False)  # noqa: E731
    assert bool((exact_gelu(x) == ref(x)).all())  # bit-identical forward
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


def test_layer_norm_constant_rows_and_default_dtype() -> None:
    x = jnp.ones((2, 8))
    out, v = LayerNorm().init_with_output(jax.random.key(0), x)
    assert out.dtype == jnp.float32 and bool((out == 0).all())
    gx = jax.grad(lambda x: LayerNorm().apply(v, x).sum())(x)
    assert bool(jnp.isfinite(gx).all()) and bool((gx == 0).all())
