"""Tests for vipa_jax/metrics.py: hand values, NumPy reference, streaming, psum, protocols."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vipa_jax import metrics
from vipa_jax.metrics import RISMetrics, iou_stats, iou_stats_numpy


def _hand_batch() -> tuple[np.ndarray, np.ndarray]:
    """Six 2x3 cases with known I/U (see test_hand_computed_values)."""
    z = [[0, 0, 0], [0, 0, 0]]
    pred = [
        [[1, 1, 0], [0, 0, 0]],  # I=1 U=3 IoU 1/3
        z,  # empty prediction, gt 1 px: I=0 U=1 IoU 0
        [[1, 0, 0], [0, 0, 0]],  # empty gt: I=0 U=1 IoU 0
        z,  # both empty: U=0 -> empty_iou
        [[1, 1, 1], [1, 0, 0]],  # perfect: 4/4
        [[1, 1, 1], [1, 1, 0]],  # 4/5 = 0.8 exactly on the threshold
    ]
    gt = [
        [[0, 1, 1], [0, 0, 0]],
        [[1, 0, 0], [0, 0, 0]],
        z,
        z,
        [[1, 1, 1], [1, 0, 0]],
        [[1, 1, 1], [1, 0, 0]],
    ]
    return np.array(pred, bool), np.array(gt, bool)


def test_hand_computed_values() -> None:
    pred, gt = _hand_batch()
    np.testing.assert_allclose(metrics.sample_ious(pred, gt), [1 / 3, 0, 0, 1, 1, 0.8])
    r = RISMetrics().update_numpy(pred, gt).result()
    assert r["count"] == 6 and r["protocol"] == "lavt"
    np.testing.assert_allclose(r["oIoU"], 9 / 14, rtol=1e-12)  # (1+4+4)/(3+1+1+0+4+5)
    np.testing.assert_allclose(r["mIoU"], (1 / 3 + 1 + 1 + 0.8) / 6, rtol=1e-12)
    # IoU >= X (not >): 0.8 counts at P@0.8.
    expect_p = {"P@0.5": 3 / 6, "P@0.6": 3 / 6, "P@0.7": 3 / 6, "P@0.8": 3 / 6, "P@0.9": 2 / 6}
    for k, v in expect_p.items():
        assert r[k] == pytest.approx(v, abs=1e-12), k
    # LAVT's convention (both empty -> 0): only mIoU and P@X change.
    r0 = RISMetrics(empty_iou=0.0).update_numpy(pred, gt).result()
    assert r0["oIoU"] == r["oIoU"]
    np.testing.assert_allclose(r0["mIoU"], (1 / 3 + 1 + 0.8) / 6, rtol=1e-12)
    assert r0["P@0.5"] == pytest.approx(2 / 6) and r0["P@0.9"] == pytest.approx(1 / 6)


def test_jit_stats_match_numpy_hand_batch() -> None:
    pred, gt = _hand_batch()
    s = jax.jit(iou_stats)(pred, gt)
    assert s["intersection"].dtype == jnp.int32 and s["hits"].shape == (5,)
    assert int(s["intersection"]) == 9 and int(s["union"]) == 14 and int(s["count"]) == 6
    np.testing.assert_array_equal(np.asarray(s["hits"]), [3, 3, 3, 3, 2])
    np.testing.assert_allclose(float(s["iou_sum"]), 1 / 3 + 2.8, rtol=1e-6)
    sn = iou_stats_numpy(pred, gt)
    assert int(sn["union"]) == 14 and sn["intersection"].dtype == np.int64


def _random_masks(seed: int, b: int = 12, h: int = 17, w: int = 13) -> tuple[np.ndarray, ...]:
    """Masks of very different sizes (so oIoU != mIoU) and noisy predictions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    gt = np.zeros((b, h, w), bool)
    for i in range(b):
        r = rng.uniform(1.5, 8)
        gt[i] = (yy - rng.uniform(0, h)) ** 2 + (xx - rng.uniform(0, w)) ** 2 <= r * r
    flip = rng.random((b, h, w)) < rng.uniform(0.02, 0.3, size=(b, 1, 1))
    pred = gt ^ flip
    return pred, gt


def _numpy_reference(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """Independent per-sample loop in the style of LAVT test.py (with empty -> 1)."""
    cum_i = cum_u = 0
    ious = []
    for p, g, v in zip(pred, gt, valid, strict=True):
        if not v:
            continue
        i = int(np.logical_and(p, g).sum())
        u = int(np.logical_or(p, g).sum())
        cum_i += i
        cum_u += u
        ious.append(1.0 if u == 0 else i / u)
    out = {"oIoU": cum_i / cum_u, "mIoU": float(np.mean(ious)), "count": len(ious)}
    for t in (0.5, 0.6, 0.7, 0.8, 0.9):
        out[f"P@{t:g}"] = float(np.mean([x >= t for x in ious]))
    return out


def _assert_results_equal(a: dict, b: dict, rtol: float = 1e-12) -> None:
    assert a["count"] == b["count"]
    for k in ("oIoU", "mIoU", "P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9"):
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, err_msg=k)


def test_random_matches_numpy_reference_and_oiou_differs_from_miou() -> None:
    pred, gt = _random_masks(0)
    valid = np.ones(len(pred), bool)
    ref = _numpy_reference(pred, gt, valid)
    assert abs(ref["oIoU"] - ref["mIoU"]) > 0.01
    got = RISMetrics().update_numpy(pred, gt).result()
    _assert_results_equal(got, ref)
    got_jit = RISMetrics().update(jax.jit(iou_stats)(pred, gt)).result()
    _assert_results_equal(got_jit, ref, rtol=1e-6)  # float32 Σ IoU on device


def test_valid_false_samples_excluded() -> None:
    pred, gt = _random_masks(1)
    valid = np.arange(len(pred)) % 3 != 0
    ref = _numpy_reference(pred, gt, valid)
    for s in (iou_stats(pred, gt, valid), iou_stats_numpy(pred, gt, valid)):
        got = RISMetrics().update(s).result()
        assert got["count"] == int(valid.sum()) == 8
        _assert_results_equal(got, ref, rtol=1e-6)
    with pytest.raises(ValueError, match="valid must have shape"):
        iou_stats_numpy(pred, gt, valid[:3])


def test_streaming_equals_one_shot_and_merge() -> None:
    pred, gt = _random_masks(2, b=11)
    one = RISMetrics().update_numpy(pred, gt).result()
    stream = RISMetrics()
    for sl in (slice(0, 4), slice(4, 5), slice(5, 11)):
        stream.update(jax.jit(iou_stats)(pred[sl], gt[sl]))
    _assert_results_equal(stream.result(), one, rtol=1e-6)
    a = RISMetrics().update_numpy(pred[:6], gt[:6])
    b = RISMetrics().update_numpy(pred[6:], gt[6:])
    merged = a.merge(b).result()
    _assert_results_equal(merged, one)
    with pytest.raises(ValueError, match="cannot merge"):
        RISMetrics(protocol="original").merge(RISMetrics())


def test_psum_across_two_devices_equals_one_shot() -> None:
    pred, gt = _random_masks(3, b=8)
    valid = np.array([1, 1, 1, 0, 1, 1, 0, 1], bool)
    # Two "devices" via vmap with a named axis: each sees half the batch, then psum.
    dev = lambda p, g, v: jax.lax.psum(iou_stats(p, g, v), "d")
    split = lambda x: x.reshape(2, 4, *x.shape[1:])
    s = jax.jit(jax.vmap(dev, axis_name="d"))(split(pred), split(gt), split(valid))
    one = iou_stats(pred, gt, valid)
    for k in metrics.STAT_KEYS:
        np.testing.assert_allclose(np.asarray(s[k][0]), np.asarray(one[k]), rtol=1e-6, err_msg=k)
        np.testing.assert_array_equal(np.asarray(s[k][0]), np.asarray(s[k][1]))
    assert int(s["count"][0]) == 6


def test_per_sample_csv(tmp_path) -> None:
    pred, gt = _hand_batch()
    m = RISMetrics(keep_per_sample=True)
    m.update_numpy(pred[:3], gt[:3], valid=np.array([1, 0, 1], bool), ids=["a", "b", "c"])
    s = iou_stats(pred[3:], gt[3:])
    m.update(s, ious=metrics.sample_ious(jnp.asarray(pred[3:]), jnp.asarray(gt[3:])))
    assert [k for k, _ in m.per_sample] == ["a", "c", None, None, None]
    path = tmp_path / "sub" / "ious.csv"
    m.save_per_sample_csv(path)
    rows = path.read_text().strip().splitlines()
    assert rows[0] == "id,iou" and rows[1] == "a,0.333333" and rows[2] == "c,0.000000"
    assert rows[3:] == ["2,1.000000", "3,1.000000", "4,0.800000"]
    with pytest.raises(ValueError, match="keep_per_sample"):
        RISMetrics().save_per_sample_csv(path)


def test_upsample_logits_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(4).standard_normal((2, 16, 16)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], size=(37, 53),
                                          mode="bilinear", align_corners=True)[:, 0].numpy()
    got = metrics.upsample_logits_to(x, (37, 53))
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(metrics.upsample_logits_to(jnp.asarray(x), (37, 53))),
                               ref, atol=1e-5)


def _ellipse_field(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Signed implicit function of an ellipse in a 300x200 image: > 0 inside."""
    return 1.0 - ((ys - 150.0) / 110.0) ** 2 - ((xs - 95.0) / 70.0) ** 2


def test_original_protocol_nonsquare_ellipse_roundtrip() -> None:
    h, w = 300, 200
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    gt = _ellipse_field(yy, xx) > 0
    # 64x64 network-resolution logits sampled at the align_corners grid of the original image.
    gy = np.linspace(0, h - 1, 64)[:, None]
    gx = np.linspace(0, w - 1, 64)[None, :]
    logits = (8.0 * _ellipse_field(gy, gx)).astype(np.float32)[None]  # (1, 64, 64)
    m = RISMetrics(protocol="original").update_original(logits, [gt])
    r = m.result()
    assert r["count"] == 1 and r["protocol"] == "original"
    # align_corners gives 0.9993 here; a half-pixel (jax.image.resize) upsampling gives 0.978.
    assert r["mIoU"] >= 0.995 and r["oIoU"] >= 0.995
    # Swapping the size convention (W, H) must be noticed: the prediction shape would differ.
    with pytest.raises(ValueError, match="must both be"):
        metrics.iou_stats_numpy((metrics.upsample_logits_to(logits, (w, h)) > 0), gt[None])
    # Padding samples are skipped; count equals the valid ones.
    m2 = RISMetrics(protocol="original").update_original(
        np.concatenate([logits, -logits]), [gt, gt], valid=np.array([True, False]))
    assert m2.result()["count"] == 1 and m2.result()["mIoU"] == r["mIoU"]


def test_results_table_and_save(tmp_path) -> None:
    pred, gt = _hand_batch()
    res = {
        "val": RISMetrics().update_numpy(pred, gt).result(),
        "val_original": RISMetrics(protocol="original").update_numpy(pred[4:], gt[4:]).result(),
    }
    md = metrics.results_table_markdown(res)
    lines = md.splitlines()
    assert lines[0] == "| split | protocol | oIoU | mIoU | P@0.5 | P@0.6 | P@0.7 | P@0.8 | P@0.9 " \
                       "| count |"
    # 9/14 = 64.29 %, mIoU 3.1333/6 = 52.22 %, P@0.9 = 2/6 = 33.33 %.
    assert lines[2] == "| val | lavt | 64.29 | 52.22 | 50.00 | 50.00 | 50.00 | 50.00 | 33.33 | 6 |"
    assert lines[3].startswith("| val_original | original | 88.89 | 90.00 |")
    assert "Protocol `lavt`" in md and "Protocol `original`" in md
    jpath, mpath = tmp_path / "a" / "r.json", tmp_path / "b" / "r.md"
    table = metrics.save_results(res, jpath, mpath)
    assert mpath.read_text() == table == md
    loaded = json.loads(jpath.read_text())
    assert loaded["val"]["count"] == 6 and loaded["val"]["protocol"] == "lavt"
    assert math.isclose(loaded["val"]["oIoU"], 9 / 14)
    # An empty accumulator gives NaN metrics, written as JSON null and '—' in the table.
    empty = {"test": RISMetrics().result()}
    assert math.isnan(empty["test"]["oIoU"]) and empty["test"]["count"] == 0
    metrics.save_results(empty, jpath)
    assert json.loads(jpath.read_text())["test"]["mIoU"] is None
    assert "| test | lavt | — | — |" in metrics.results_table_markdown(empty)


def test_errors() -> None:
    with pytest.raises(ValueError, match="protocol"):
        RISMetrics(protocol="cgformer")
    with pytest.raises(ValueError, match="must both be"):
        iou_stats(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 3), bool))
    with pytest.raises(KeyError, match="missing"):
        RISMetrics().update({"intersection": 1})
    s = iou_stats_numpy(*_hand_batch(), thresholds=(0.5,))
    with pytest.raises(ValueError, match="thresholds"):
        RISMetrics().update(s)
