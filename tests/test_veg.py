"""Visual Expressive Generator: straight-through Gumbel top-k, gradients, determinism, switches."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vipa_jax.models.veg import (
    VisualExpressiveGenerator,
    cue_mask,
    num_selected,
    straight_through,
    topk_mask,
)

B, L, N, CV, CL = 2, 6, 20, 24, 16


@pytest.fixture(scope="module")
def inputs():
    vis = jax.random.normal(jax.random.key(0), (B, N, CV))
    lang = jax.random.normal(jax.random.key(1), (B, L, CL))
    token_mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
    return vis, lang, token_mask


def share_params(src, dst):
    """dst with every leaf that src has at the same path and shape, so only a switch differs."""
    if isinstance(dst, dict):
        return {k: share_params(src[k], v) if isinstance(src, dict) and k in src else v
                for k, v in dst.items()}
    return src if getattr(src, "shape", None) == dst.shape else dst


def _veg(**kw):
    return VisualExpressiveGenerator(dim=16, num_heads=2, mlp_ratio=2.0, **kw)


def _init(veg, inputs):
    return veg.init({"params": jax.random.key(2), "gumbel": jax.random.key(3)}, *inputs, train=True)


def test_topk_mask_exactly_k_per_row():
    scores = jax.random.normal(jax.random.key(0), (3, 5, 17))
    for k in (1, 4, 17):
        m = np.asarray(topk_mask(scores, k))
        assert set(np.unique(m)) <= {0.0, 1.0}
        np.testing.assert_array_equal(m.sum(-1), k)
        # the selected entries are the k largest
        kth = np.sort(np.asarray(scores), -1)[..., -k][..., None]
        np.testing.assert_array_equal(m, (np.asarray(scores) >= kth).astype(np.float32))


def test_num_selected_and_bad_ratio():
    assert num_selected(0.3, 225) == math.ceil(0.3 * 225) == 68
    assert num_selected(0.01, 10) == 1
    with pytest.raises(ValueError, match="topk_ratio"):
        num_selected(0.0, 10)


def test_straight_through_forward_hard_backward_soft():
    soft = jnp.array([0.1, 0.6, 0.3])
    hard = jnp.array([0.0, 1.0, 0.0])
    np.testing.assert_array_equal(straight_through(hard, soft), hard)
    w = jnp.array([1.0, 2.0, 3.0])
    g = jax.grad(lambda s: (straight_through(hard, s) * w).sum())(soft)
    np.testing.assert_allclose(g, w)  # identity gradient through the soft path


def test_forward_mask_has_k_ones_and_gradients_reach_phi_and_tau(inputs):
    veg = _veg(topk_ratio=0.3)
    variables = _init(veg, inputs)
    out = veg.apply(variables, *inputs, train=True, rngs={"gumbel": jax.random.key(5)})
    k = num_selected(0.3, N)
    m = np.asarray(out["mask"])
    assert set(np.unique(m)) <= {0.0, 1.0}, "forward must be exactly the hard mask"
    np.testing.assert_array_equal(m.sum(-1), k)
    assert out["tokens"].shape == (B, L, 16)

    def loss(params):
        o = veg.apply({"params": params}, *inputs, train=True, rngs={"gumbel": jax.random.key(5)})
        return jnp.sum(o["tokens"] ** 2)

    grads = jax.grad(loss)(variables["params"])["select_global"]
    for name in ("phi_v", "phi_l"):
        g = np.asarray(grads[name]["kernel"])
        assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, f"no gradient reached {name}"
    g_tau = float(grads["log_tau"])
    assert np.isfinite(g_tau) and g_tau != 0.0, "no gradient reached tau"


def test_gumbel_key_controls_mask_and_eval_is_deterministic(inputs):
    veg = _veg(topk_ratio=0.3)
    variables = _init(veg, inputs)

    def mask(train, key):
        return np.asarray(
            veg.apply(variables, *inputs, train=train, rngs={"gumbel": jax.random.key(key)})["mask"]
        )

    np.testing.assert_array_equal(mask(True, 7), mask(True, 7))
    assert not np.array_equal(mask(True, 7), mask(True, 8)), "different keys, same selection"
    # eval: no noise, no rng needed, identical whatever key is passed
    np.testing.assert_array_equal(mask(False, 7), mask(False, 8))
    out = veg.apply(variables, *inputs, train=False)
    np.testing.assert_array_equal(np.asarray(out["mask"]), mask(False, 1))
    # eval selection = top-k of the clean cosine relevance
    k = num_selected(0.3, N)
    expected = np.asarray(topk_mask(out["similarity"], k))
    np.testing.assert_array_equal(np.asarray(out["mask"]), expected)


def test_cue_mask():
    tm = jnp.array([[1, 1, 1, 0]])
    np.testing.assert_array_equal(cue_mask(tm, "both"), [[True, True, True, False]])
    np.testing.assert_array_equal(cue_mask(tm, "global"), [[True, False, False, False]])
    np.testing.assert_array_equal(cue_mask(tm, "local"), [[False, True, True, False]])
    with pytest.raises(ValueError, match="veg.cues"):
        cue_mask(tm, "all")


def test_padding_tokens_do_not_change_outputs(inputs):
    vis, lang, tm = inputs
    veg = _veg()
    variables = _init(veg, inputs)
    out = veg.apply(variables, vis, lang, tm, train=False)
    pad = jax.random.normal(jax.random.key(9), (B, 3, CL))
    out2 = veg.apply(
        variables, vis, jnp.concatenate([lang, pad], 1),
        jnp.concatenate([tm, jnp.zeros((B, 3), tm.dtype)], 1), train=False,
    )
    valid = np.asarray(tm, bool)
    np.testing.assert_allclose(
        np.asarray(out2["tokens"])[:, :L][valid], np.asarray(out["tokens"])[valid], atol=1e-5
    )


@pytest.mark.parametrize(
    "switch",
    [
        dict(step1=False), dict(step2=False), dict(cues="global"), dict(cues="local"),
        dict(topk_ratio=0.6), dict(selection="threshold"), dict(selection="none"),
    ],
)
def test_each_switch_trains_and_changes_tokens(inputs, switch):
    base = _veg()
    variables = _init(base, inputs)
    ref = base.apply(variables, *inputs, train=False)["tokens"]
    veg = _veg(**switch)
    v2 = _init(veg, inputs)
    params = share_params(variables["params"], v2["params"])
    out = veg.apply({"params": params}, *inputs, train=False)["tokens"]
    rngs = {"gumbel": jax.random.key(5)}
    grads = jax.grad(
        lambda p: jnp.sum(veg.apply({"params": p}, *inputs, train=True, rngs=rngs)["tokens"] ** 2)
    )(params)
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert sum(float(np.abs(g).sum()) for g in leaves) > 0
    valid = np.asarray(cue_mask(inputs[2], switch.get("cues", "both")))
    diff = np.abs(np.asarray(out) - np.asarray(ref))[valid].max()
    assert diff > 1e-3, f"switch {switch} did not change Ê_V (max diff {diff:.2e})"
