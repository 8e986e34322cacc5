"""Decoder 3×3 convolutions: the Winograd F(2×2, 3×3) path equals XLA's convolution (values
and gradients), keeps nn.Conv's parameter tree, and serves the whole model
(`model.decoder.conv_impl`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vipa_jax.models.decoder import (
    ConvNormReLU,
    conv3x3_taps,
    resolve_conv_impl,
    winograd_conv3x3,
    winograd_kernel,
    winograd_tile,
)
from vipa_jax.models.vipa import build_model, init_variables, with_inference_cache


def _conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)


# float32 error relative to the largest output: F(4×4) and F(6×6) have larger transform
# coefficients.
F32_TOL = {2: 2e-6, 4: 5e-5, 6: 1e-4}


@pytest.mark.parametrize("tile", [2, 4, 6])
@pytest.mark.parametrize("shape", [(2, 8, 8, 5), (1, 7, 10, 3), (1, 1, 3, 4), (3, 13, 5, 16)])
def test_winograd_matches_convolution(shape, tile):
    """Even, odd and one-pixel maps (not multiples of the tile too); batch > 1; against lax's
    convolution in float32 and a NumPy direct convolution in float64 (where only rounding is
    left)."""
    b, h, w, c = shape
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape)
    kernel = rng.standard_normal((3, 3, c, 6))
    ref = np.asarray(_conv(jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32)))
    out = np.asarray(winograd_conv3x3(jnp.asarray(x, jnp.float32),
                                      jnp.asarray(kernel, jnp.float32), tile))
    assert out.shape == (b, h, w, 6)
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() <= F32_TOL[tile] * scale, np.abs(out - ref).max() / scale
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    direct = sum(np.einsum("bhwc,cf->bhwf", xp[:, i:i + h, j:j + w], kernel[i, j])
                 for i in range(3) for j in range(3))
    with jax.enable_x64(True):
        out64 = np.asarray(winograd_conv3x3(jnp.asarray(x), jnp.asarray(kernel), tile))
    np.testing.assert_allclose(out64, direct, rtol=1e-11, atol=1e-12 * np.abs(direct).max())


@pytest.mark.parametrize("tile", [2, 4, 6])
def test_winograd_gradients_match_convolution(tile):
    """Its gradients (input and kernel) are the convolution's: it trains as well."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 6, 4)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)
    probe = jnp.asarray(rng.standard_normal((2, 9, 6, 5)), jnp.float32)

    def grads(conv):
        return jax.grad(lambda a, k: jnp.sum(conv(a, k) * probe), argnums=(0, 1))(x, kernel)

    wino = grads(lambda a, k: winograd_conv3x3(a, k, tile))
    for got, want in zip(wino, grads(_conv), strict=True):
        scale = float(jnp.abs(want).max())
        assert scale > 1.0
        assert float(jnp.abs(got - want).max()) <= 10 * F32_TOL[tile] * scale


def test_winograd_tile_policy():
    """'winograd' picks F(6×6) from 96 px, F(4×4) from 48 px, XLA's conv below (the paper config
    at 480: 120, 60 and 30 pixel maps); with the kernel transform cached, from 24 px the tile with
    fewer multiply-adds (F(4×4) on ties); bad names and tiles are errors."""
    sides = (120, 100, 96, 95, 60, 48, 47, 30)
    assert [winograd_tile("winograd", s, s) for s in sides] == [6, 6, 6, 4, 4, 4, None, None]
    assert winograd_tile("winograd", 120, 40) is None  # the shorter side decides
    # F(6×6) on 98 px pads to 102 (17² tiles × 64 = 18496 multiply-adds per channel pair), F(4×4)
    # to 100 (25² × 36 = 22500): F(6×6). On 100×124: 17·21·64 = 22848 against 25·31·36 = 27900.
    assert winograd_tile("winograd", 98, 98) == 6 and winograd_tile("winograd", 100, 124) == 6
    # with the transformed kernel cached (inference), from 24 px: the paper config's 30 px maps too
    cached = [winograd_tile("winograd", s, s, cached=True) for s in (120, 60, 30, 24, 23)]
    assert cached == [6, 6, 6, 6, None]
    # 32 px: 6² tiles × 64 = 2304 for F(6×6), 8² × 36 = 2304 for F(4×4): a tie, F(4×4);
    # 40 px: 7² × 64 = 3136 against 10² × 36 = 3600
    assert winograd_tile("winograd", 32, 32, cached=True) == 4
    assert winograd_tile("winograd", 40, 40, cached=True) == 6
    assert winograd_tile("xla", 120, 120, cached=True) is None
    assert winograd_tile("xla", 120, 120) is None
    assert winograd_tile("winograd2", 8, 8) == 2 and winograd_tile("winograd4", 8, 8) == 4
    assert winograd_tile("winograd6", 8, 8) == 6
    with pytest.raises(ValueError, match="decoder.conv_impl must be one of"):
        winograd_tile("fft", 8, 8)
    with pytest.raises(ValueError, match="tile must be one of"):
        winograd_conv3x3(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), tile=3)


def test_auto_conv_impl_by_backend_and_dtype(monkeypatch):
    """'auto' (the default) is Winograd's map-size policy for float32 on CPU and the nine-GEMM
    convolution for bfloat16 there, XLA's convolution on another backend (cuDNN on GPU);
    explicit choices stay as given."""
    from vipa_jax.defaults import get_base_config

    assert get_base_config().model.decoder.conv_impl == "auto" == ConvNormReLU.conv_impl
    assert jax.default_backend() == "cpu"
    assert resolve_conv_impl("auto") == "winograd"
    assert [winograd_tile("auto", s, s) for s in (120, 60, 30)] == [6, 4, None]
    assert winograd_tile("auto", 120, 120, jnp.bfloat16) is None
    assert resolve_conv_impl("auto", jnp.bfloat16) == "taps"
    assert resolve_conv_impl("winograd4", jnp.bfloat16) == "winograd4"
    assert resolve_conv_impl("xla") == "xla"

    def uses_xla_conv(dtype):  # ConvNormReLU passes its compute dtype to the policy
        m = ConvNormReLU(4, norm="group", dtype=dtype)
        x = jnp.zeros((1, 96, 96, 2))
        return "conv_general_dilated" in str(jax.make_jaxpr(
            lambda: m.init_with_output(jax.random.key(0), x))())

    assert not uses_xla_conv(jnp.float32) and not uses_xla_conv(jnp.bfloat16)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_conv_impl("auto") == "xla" and winograd_tile("auto", 120, 120) is None
    assert resolve_conv_impl("auto", jnp.bfloat16) == "xla"
    assert uses_xla_conv(jnp.float32) and uses_xla_conv(jnp.bfloat16)


def test_conv_norm_relu_impls_share_parameters():
    """Winograd has nn.Conv's parameter tree (Conv_0/kernel) and the same output; an unknown
    conv_impl is an error that names the field."""
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 8))
    xla = ConvNormReLU(16, norm="group", conv_impl="xla")
    wino = ConvNormReLU(16, norm="group", conv_impl="winograd4")
    variables = xla.init(jax.random.key(1), x)
    assert jax.tree.structure(wino.init(jax.random.key(1), x)) == jax.tree.structure(variables)
    assert variables["params"]["Conv_0"]["kernel"].shape == (3, 3, 8, 16)
    np.testing.assert_allclose(np.asarray(wino.apply(variables, x)),
                               np.asarray(xla.apply(variables, x)), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="decoder.conv_impl must be one of"):
        ConvNormReLU(16, conv_impl="fft").init(jax.random.key(1), x)


def test_model_conv_impl_switch(tiny_model):
    """The whole model with model.decoder.conv_impl='winograd2' (its maps are too small for
    'winograd' or the default 'auto' to pick Winograd) loads the default model's variables and
    gives the same logits (gradients: `test_winograd_gradients_match_convolution`)."""
    cfg, model, variables = (tiny_model[k] for k in ("config", "model", "variables"))
    size, n = cfg.model.image_size, cfg.model.max_tokens
    cfg_w = cfg.model.copy_and_resolve_references()
    cfg_w.decoder.conv_impl = "winograd2"
    model_w = build_model(cfg_w)
    images = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    ids = jnp.asarray(np.tile(np.array([101, 7, 9, 102] + [0] * (n - 4), np.int32), (2, 1)))
    mask = (ids > 0).astype(jnp.int32)
    la, lb = (jax.jit(lambda v, m=m: m.apply(v, images, ids, mask, train=False)["logits"])(
        variables) for m in (model, model_w))
    assert float(jnp.abs(la).max()) > 1e-3
    np.testing.assert_allclose(np.asarray(lb), np.asarray(la), rtol=1e-4, atol=1e-5)


def test_winograd_cache(tiny_model):
    """`with_inference_cache` stores U = G g Gᵀ of every Winograd conv once; inference with it
    gives the logits of the uncached forward (which at these map sizes uses XLA's conv: the cache
    lets F(6×6) run on the 24 px maps); init never creates the collection; a cache of another
    tile is an error that names the conv; without Winograd convs nothing is added."""
    cfg = tiny_model["config"].model.copy_and_resolve_references()
    cfg.image_size, n = 96, cfg.max_tokens  # 1/4, 1/8, 1/16 maps: 24, 12, 6 px
    cfg.decoder.conv_impl = "winograd"
    model = build_model(cfg)
    variables = jax.jit(lambda k: init_variables(model, k, 96, n))(jax.random.key(0))
    assert "winograd" not in variables
    images = jax.random.normal(jax.random.key(1), (1, 96, 96, 3))
    ids = jnp.asarray(np.array([[101, 7, 9, 102] + [0] * (n - 4)], np.int32))
    mask = (ids > 0).astype(jnp.int32)
    cached = with_inference_cache(model, variables, images, ids, mask)
    cache = cached["winograd"]["decoder"]
    assert sorted(cache) == ["up1_0", "up1_1"]  # only the 1/4 maps reach 24 px
    kernel = variables["params"]["decoder"]["up1_0"]["Conv_0"]["kernel"]
    np.testing.assert_allclose(np.asarray(cache["up1_0"]["Conv_0"]["u"]),
                               np.asarray(winograd_kernel(kernel, 6)), rtol=1e-6, atol=1e-7)

    def logits(m, v):
        return m.apply(v, images, ids, mask, train=False)["logits"]

    fwd = jax.jit(logits, static_argnums=0)  # one compile per model and variable tree
    want = fwd(model, variables)
    assert float(jnp.abs(want).max()) > 1e-3
    np.testing.assert_allclose(np.asarray(fwd(model, cached)), np.asarray(want),
                               rtol=1e-4, atol=1e-5)
    # the cache is what runs: another U changes the output (−U: the convs' norm keeps the sign)
    stale = {**cached, "winograd": jax.tree.map(lambda u: -u, cached["winograd"])}
    assert float(jnp.abs(fwd(model, stale) - want).max()) > 1e-3
    # training ignores a cache: U comes from the kernel, and the gradient reaches it
    unit = ConvNormReLU(8, norm="group", conv_impl="winograd4")
    x = jax.random.normal(jax.random.key(4), (1, 8, 8, 3))
    v = unit.init(jax.random.key(5), x)
    bogus = {"Conv_0": {"u": jnp.zeros((36, 3, 8))}}

    def unit_loss(params, extra):
        return jnp.sum(unit.apply({"params": params, **extra}, x, train=True) ** 2)

    grads = [jax.grad(unit_loss)(v["params"], extra)["Conv_0"]["kernel"]
             for extra in ({}, {"winograd": bogus})]
    assert float(jnp.abs(grads[0]).max()) > 0
    np.testing.assert_allclose(np.asarray(grads[1]), np.asarray(grads[0]), rtol=1e-6)
    # ...while inference reads it (all-zero U: the conv's output is 0, the norm's too)
    assert float(jnp.abs(unit.apply({**v, "winograd": bogus}, x)).max()) == 0
    cfg.decoder.conv_impl = "winograd2"  # F(2×2) expects (16, C, F), the cache holds F(6×6)'s
    with pytest.raises(ValueError, match=r"up1_0/Conv_0: cached winograd/u has shape \(64, "):
        jax.eval_shape(lambda v: logits(build_model(cfg), v), cached)
    cfg.decoder.conv_impl = "xla"
    assert "winograd" not in with_inference_cache(build_model(cfg), cached, images, ids, mask)


@pytest.mark.parametrize("shape", [(2, 8, 8, 5), (1, 7, 10, 3), (1, 1, 3, 4), (3, 13, 5, 16)])
def test_taps_conv_matches_convolution(shape):
    """`conv3x3_taps` (nine GEMMs over the flattened padded map) is the convolution: in float32
    to rounding, with the same gradients; in bfloat16 (float32 results on this CPU: every GEMM
    asks for them) as close to the float32 convolution as XLA's bfloat16 convolution is."""
    from vipa_jax.models.layers import dot_results

    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, shape[-1], 6)), jnp.float32)
    ref = np.asarray(_conv(x, kernel))
    scale = np.abs(ref).max()
    out = np.asarray(conv3x3_taps(x, kernel))
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 2e-6 * scale
    probe = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)

    def grads(conv):
        return jax.grad(lambda a, k: jnp.sum(conv(a, k) * probe), argnums=(0, 1))(x, kernel)

    for got, want in zip(grads(conv3x3_taps), grads(_conv), strict=True):
        assert float(jnp.abs(got - want).max()) <= 2e-5 * float(jnp.abs(want).max())

    xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    with dot_results("float32"):
        jaxpr = jax.make_jaxpr(conv3x3_taps)(xb, kb)
        low = np.asarray(conv3x3_taps(xb, kb), np.float32)
    types = [e.params["preferred_element_type"] for e in jaxpr.eqns
             if e.primitive.name == "dot_general"]
    # all nine, except where XLA:CPU's GEMM library would not take them (every side < 8)
    gemm = (shape[0] * shape[1] * (shape[2] + 2), shape[3], 6)
    assert types == [jnp.float32 if max(gemm) >= 8 else None] * 9, (types, gemm)
    xla_low = np.asarray(_conv(xb, kb), np.float32)
    assert np.abs(low - ref).max() <= 2 * np.abs(xla_low - ref).max() + 1e-3 * scale


def test_taps_conv_shares_parameters():
    """'taps' has nn.Conv's parameter tree (Conv_0/kernel) and its output."""
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 8))
    xla = ConvNormReLU(16, norm="group", conv_impl="xla")
    taps = ConvNormReLU(16, norm="group", conv_impl="taps")
    variables = xla.init(jax.random.key(1), x)
    assert jax.tree.structure(taps.init(jax.random.key(1), x)) == jax.tree.structure(variables)
    np.testing.assert_allclose(np.asarray(taps.apply(variables, x)),
                               np.asarray(xla.apply(variables, x)), rtol=1e-4, atol=1e-4)
