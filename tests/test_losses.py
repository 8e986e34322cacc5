"""Tests for vipa_jax/losses.py against PyTorch references and hand-computed values."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vipa_jax import losses

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _rand(seed: int, b: int = 3, h: int = 12, w: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((b, h, w)) * 3).astype(np.float32)
    mask = (rng.random((b, h, w)) > 0.6).astype(np.float32)
    return logits, mask


def _cfg(contrastive: bool = True) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(bce_weight=1.0, dice_weight=1.0, contrastive=contrastive, contrastive_weight=0.5)
    )


# --- resize helper ----------------------------------------------------------------------------


@pytest.mark.parametrize("src,dst", [((7, 5), (30, 22)), ((15, 15), (480, 480)), ((9, 13), (4, 6)),
                                     ((1, 4), (3, 8)), ((6, 6), (1, 1))])
def test_resize_matches_torch_align_corners(src: tuple[int, int], dst: tuple[int, int]) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, *src)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), size=dst, mode="bilinear", align_corners=True).numpy()
    got_j = np.asarray(jax.jit(lambda a: losses.resize_bilinear_align_corners(a, dst))(x))
    got_n = losses.resize_bilinear_align_corners(x, dst)
    assert isinstance(got_n, np.ndarray) and got_n.dtype == np.float32
    assert got_j.shape == ref.shape == (2, 3, *dst)
    np.testing.assert_allclose(got_j, ref, atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(got_n, ref, atol=1e-5, rtol=1e-6)


def test_resize_hand_values_and_nhwc_axes() -> None:
    # align_corners=True: 2 -> 3 samples at src 0, 0.5, 1 (corners kept; half-pixel would differ).
    x = np.array([[0.0, 4.0], [8.0, 12.0]], np.float32)
    got = losses.resize_bilinear_align_corners(x, (3, 3))
    np.testing.assert_allclose(got, [[0, 2, 4], [4, 6, 8], [8, 10, 12]], atol=0)
    nhwc = np.random.default_rng(1).standard_normal((2, 5, 4, 3)).astype(np.float32)
    a = losses.resize_bilinear_align_corners(jnp.asarray(nhwc), (9, 7), axes=(1, 2))
    b = losses.resize_bilinear_align_corners(nhwc.transpose(0, 3, 1, 2), (9, 7))
    assert a.shape == (2, 9, 7, 3)
    np.testing.assert_allclose(np.asarray(a), b.transpose(0, 2, 3, 1), atol=1e-6)
    with pytest.raises(ValueError, match="size must be"):
        losses.resize_bilinear_align_corners(x, (3,))


def test_resize_keeps_bf16_dtype() -> None:
    x = jnp.ones((2, 4, 4), jnp.bfloat16)
    y = losses.resize_bilinear_align_corners(x, (8, 8))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), 1.0)


# --- BCE / Dice / contrastive -----------------------------------------------------------------


def test_bce_matches_torch() -> None:
    logits, mask = _rand(0)
    ref = F.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(mask))
    got = jax.jit(losses.bce_loss)(logits, mask)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), ref.item(), rtol=1e-6, atol=1e-6)


def test_bce_hand_value() -> None:
    # x=0 -> log 2 regardless of t; x=log 3, t=1 -> log(1 + 1/3).
    logits = np.array([[[0.0, math.log(3.0)]]], np.float32)
    mask = np.array([[[1.0, 1.0]]], np.float32)
    expect = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
    np.testing.assert_allclose(float(losses.bce_loss(logits, mask)), expect, rtol=1e-6)


def _torch_dice(logits: np.ndarray, mask: np.ndarray) -> float:
    p = torch.sigmoid(torch.from_numpy(logits)).flatten(1)
    t = torch.from_numpy(mask).flatten(1)
    loss = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)  # CGFormer dice_loss
    return loss.mean().item()


def test_dice_hand_computed_2x2() -> None:
    # p = sigmoid([[0, ln3], [-ln3, 0]]) = [[.5, .75], [.25, .5]], t = [[1, 1], [0, 0]]
    # Σpt = 1.25, Σp = 2, Σt = 2 -> 1 - (2.5 + 1)/(4 + 1) = 0.3
    ln3 = math.log(3.0)
    logits = np.array([[[0.0, ln3], [-ln3, 0.0]]], np.float32)
    mask = np.array([[[1, 1], [0, 0]]], np.float32)
    np.testing.assert_allclose(float(losses.dice_loss(logits, mask)), 0.3, rtol=1e-6)
    # Second sample with an empty mask and very negative logits: dice ≈ 1 - 1/1 = 0.
    logits2 = np.concatenate([logits, np.full((1, 2, 2), -100.0, np.float32)])
    mask2 = np.concatenate([mask, np.zeros((1, 2, 2), np.float32)])
    np.testing.assert_allclose(float(losses.dice_loss(logits2, mask2)), 0.15, rtol=1e-6)


def test_dice_matches_torch_random() -> None:
    logits, mask = _rand(1, b=4)
    np.testing.assert_allclose(
        float(losses.dice_loss(logits, mask)), _torch_dice(logits, mask), rtol=1e-6, atol=1e-6
    )


def test_pixel_contrastive_matches_torch() -> None:
    rng = np.random.default_rng(2)
    rel = rng.standard_normal((2, 5, 4)).astype(np.float32) * 2
    mask = (rng.random((2, 20, 16)) > 0.5).astype(np.float32)
    up = F.interpolate(torch.from_numpy(rel)[:, None], size=(20, 16), mode="bilinear",
                       align_corners=True)[:, 0]
    ref = F.binary_cross_entropy_with_logits(up, torch.from_numpy(mask)).item()
    got = float(jax.jit(losses.pixel_contrastive_loss)(rel, mask))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


# --- vipa_loss ------------------------------------------------------------------------------


def _outputs_batch(seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((3, 16, 12)) * 2).astype(np.float32)
    rel = rng.standard_normal((3, 4, 3)).astype(np.float32)
    mask = (rng.random((3, 16, 12)) > 0.5).astype(np.float32)
    return {"logits": logits, "cls_relevance": rel}, {"mask": mask}


def test_vipa_loss_total_matches_torch_parts() -> None:
    out, batch = _outputs_batch(3)
    bce = F.binary_cross_entropy_with_logits(
        torch.from_numpy(out["logits"]), torch.from_numpy(batch["mask"])).item()
    dice = _torch_dice(out["logits"], batch["mask"])
    up = F.interpolate(torch.from_numpy(out["cls_relevance"])[:, None], size=(16, 12),
                       mode="bilinear", align_corners=True)[:, 0]
    con = F.binary_cross_entropy_with_logits(up, torch.from_numpy(batch["mask"])).item()
    total, parts = jax.jit(lambda o, b: losses.vipa_loss(o, b, _cfg()))(out, batch)
    np.testing.assert_allclose(float(parts["bce"]), bce, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(parts["dice"]), dice, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(parts["contrastive"]), con, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(total), bce + dice + 0.5 * con, rtol=1e-6, atol=1e-6)
    assert float(parts["total"]) == float(total)


def test_contrastive_off_contributes_zero() -> None:
    out, batch = _outputs_batch(4)
    t_on, p_on = losses.vipa_loss(out, batch, _cfg(True))
    t_off, p_off = losses.vipa_loss(out, batch, _cfg(False))
    assert float(p_off["contrastive"]) == 0.0
    assert float(p_on["contrastive"]) > 0.1
    np.testing.assert_allclose(float(t_off), float(p_on["bce"] + p_on["dice"]), rtol=1e-6)
    np.testing.assert_allclose(float(t_on - t_off), 0.5 * float(p_on["contrastive"]), rtol=1e-5)
    # With contrastive off the relevance map is not needed at all; with it on it is required.
    no_rel = {"logits": out["logits"]}
    np.testing.assert_allclose(float(losses.vipa_loss(no_rel, batch, _cfg(False))[0]),
                               float(t_off), rtol=1e-7)
    with pytest.raises(KeyError, match="cls_relevance"):
        losses.vipa_loss(no_rel, batch, _cfg(True))
    # Plain dict config works too.
    d = dict(bce_weight=2.0, dice_weight=0.0, contrastive=False, contrastive_weight=9.0)
    np.testing.assert_allclose(float(losses.vipa_loss(out, batch, d)[0]),
                               2 * float(p_on["bce"]), rtol=1e-6)
    with pytest.raises(KeyError, match="dice_weight"):
        losses.vipa_loss(out, batch, {"bce_weight": 1.0})


def test_valid_masking_excludes_padding() -> None:
    out, batch = _outputs_batch(5)
    valid = np.array([True, False, True])
    b1 = dict(batch, valid=valid)
    total1, parts1 = losses.vipa_loss(out, b1, _cfg())
    # Changing the padded sample (even to NaN/inf logits and a different mask) changes nothing.
    out2 = {k: v.copy() for k, v in out.items()}
    out2["logits"][1] = np.nan
    out2["cls_relevance"][1] = np.inf
    b2 = dict(mask=batch["mask"].copy(), valid=valid)
    b2["mask"][1] = 1 - b2["mask"][1]
    total2, parts2 = losses.vipa_loss(out2, b2, _cfg())
    for k in parts1:
        assert float(parts1[k]) == float(parts2[k]), k
    # And it equals the loss on the two valid samples alone.
    keep = np.array([0, 2])
    total_ref, _ = losses.vipa_loss({k: v[keep] for k, v in out.items()},
                                    {"mask": batch["mask"][keep]}, _cfg())
    np.testing.assert_allclose(float(total1), float(total_ref), rtol=1e-6)
    assert np.isfinite(float(total2))
    # No valid sample at all -> every term is 0, not NaN.
    t0, _ = losses.vipa_loss(out, dict(batch, valid=np.zeros(3, bool)), _cfg())
    assert float(t0) == 0.0


def test_gradients_finite_and_nonzero_and_padding_zero() -> None:
    out, batch = _outputs_batch(6)
    out["logits"][1] = np.nan  # padded sample
    b = dict(batch, valid=np.array([True, False, True]))
    g = jax.grad(lambda o: losses.vipa_loss(o, b, _cfg())[0])(out)
    for k in ("logits", "cls_relevance"):
        arr = np.asarray(g[k])
        assert np.all(np.isfinite(arr)), k
        assert np.abs(arr[[0, 2]]).min() > 0, k  # every real pixel gets gradient
        assert np.all(arr[1] == 0), k
    # BCE gradient w.r.t. a logit is (σ(x) - t) / (H·W·n_valid): check one element.
    x, t = out["logits"][0, 0, 0], batch["mask"][0, 0, 0]
    gb = jax.grad(lambda lg: losses.bce_loss(lg, batch["mask"], b["valid"]))(out["logits"])
    expect = (1 / (1 + np.exp(-x)) - t) / (16 * 12 * 2)
    np.testing.assert_allclose(float(gb[0, 0, 0]), expect, rtol=1e-5)


def test_large_logits_stay_finite() -> None:
    mask = np.array([[[1, 0], [1, 0]]], np.float32)
    right = np.array([[[100, -100], [100, -100]]], np.float32)
    wrong = -right
    out_r = {"logits": right, "cls_relevance": right}
    out_w = {"logits": wrong, "cls_relevance": wrong}
    t_r, p_r = losses.vipa_loss(out_r, {"mask": mask}, _cfg())
    t_w, p_w = losses.vipa_loss(out_w, {"mask": mask}, _cfg())
    np.testing.assert_allclose(float(p_r["bce"]), 0.0, atol=1e-30)
    np.testing.assert_allclose(float(p_w["bce"]), 100.0, rtol=1e-6)  # exactly |x| per pixel
    np.testing.assert_allclose(float(p_w["dice"]), 1 - 1 / 5, rtol=1e-6)  # Σp=2, Σt=2, Σpt=0
    g = jax.grad(lambda o: losses.vipa_loss(o, {"mask": mask}, _cfg())[0])(out_w)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in g.values())
    assert np.isfinite(float(t_r)) and np.isfinite(float(t_w))


def test_bf16_inputs_computed_in_float32() -> None:
    out, batch = _outputs_batch(7)
    out16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in out.items()}
    total16, parts16 = losses.vipa_loss(out16, {"mask": jnp.asarray(batch["mask"], jnp.bfloat16)},
                                        _cfg())
    # Reference: the same bf16-rounded values, upcast to float32 first.
    out32 = {k: np.asarray(v, np.float32) for k, v in out16.items()}
    total32, _ = losses.vipa_loss(out32, batch, _cfg())
    assert total16.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in parts16.values())
    np.testing.assert_allclose(float(total16), float(total32), rtol=1e-6)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="must match"):
        losses.bce_loss(np.zeros((1, 2, 2), np.float32), np.zeros((1, 2, 3), np.float32))
    with pytest.raises(ValueError, match="valid must have shape"):
        losses.dice_loss(np.zeros((2, 2, 2), np.float32), np.zeros((2, 2, 2), np.float32),
                         np.ones(3, bool))
