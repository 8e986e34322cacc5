"""Tests for vipa_jax/viz.py: tint, outline, caption strip, heatmap, PNG saving."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vipa_jax import viz


def _image(h: int = 40, w: int = 60) -> np.ndarray:
    """Grey-green gradient (never pure red, so a red tint always changes a pixel)."""
    rng = np.random.default_rng(0)
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = rng.integers(0, 100, (h, w))
    img[..., 1] = np.linspace(50, 200, w, dtype=np.uint8)[None]
    img[..., 2] = 120
    return img


def _rect_mask(h: int = 40, w: int = 60) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[10:30, 15:45] = True
    return m


def test_overlay_tint_outline_and_untouched_outside() -> None:
    img, m = _image(), _rect_mask()
    out = viz.overlay(img, m, None, color=(255, 0, 0), alpha=0.5, outline_width=1)
    assert out.dtype == np.uint8 and out.shape == img.shape
    np.testing.assert_array_equal(out[~m], img[~m])  # outside unchanged
    border = viz.mask_outline(m, 1)
    # Border = the 1-px ring of the rectangle: 2·20 + 2·30 - 4 = 96 pixels, all pure red.
    assert border.sum() == 96 and border[10, 15:45].all() and border[10:30, 44].all()
    assert not border[11:29, 16:44].any()
    np.testing.assert_array_equal(out[border], np.tile([255, 0, 0], (96, 1)))
    # Interior: exact 50/50 blend with red, e.g. (r, g, b) -> (round((r+255)/2), g/2, 60).
    inner = m & ~border
    expect = np.rint(0.5 * img[inner].astype(np.float32) + 0.5 * np.array([255, 0, 0]))
    np.testing.assert_array_equal(out[inner], expect.astype(np.uint8))
    assert np.all(np.any(out[m] != img[m], axis=-1))  # every mask pixel changed


def test_outline_width_and_edge_touching_mask() -> None:
    m = np.zeros((10, 10), bool)
    m[0:6, 0:6] = True  # touches the image's top/left edges
    b1 = viz.mask_outline(m, 1)
    b2 = viz.mask_outline(m, 2)
    assert b1.sum() == 20 and b1[0, :6].all() and b1[:6, 0].all()  # 6x6 ring = 36 - 16
    assert b2.sum() == 32  # 36 - 4 (2x2 core)
    assert not viz.mask_outline(np.zeros((5, 5), bool)).any()


def test_caption_strip_added() -> None:
    img, m = _image(), _rect_mask()
    plain = viz.overlay(img, m)
    cap = viz.overlay(img, m, "the man in the red shirt on the left")
    assert cap.dtype == np.uint8 and cap.shape[1:] == (60, 3) and cap.shape[0] > 40
    np.testing.assert_array_equal(cap[:40], plain)  # image area identical
    strip = cap[40:]
    assert (strip == 255).all(axis=-1).mean() > 0.5  # white background
    assert (strip < 128).all(axis=-1).sum() > 10  # some dark text pixels
    # A long caption wraps onto more lines -> a taller strip, still image-wide.
    long = viz.overlay(img, m, "a very long referring expression " * 6)
    assert long.shape[0] > cap.shape[0] and long.shape[1] == 60


def test_heatmap_overlay() -> None:
    img = np.full((30, 50, 3), 128, np.uint8)
    rel = np.array([[0.0, 1.0], [0.0, 0.0]], np.float32)  # peak at the top-right corner
    out = viz.heatmap_overlay(img, rel, None, alpha=1.0)
    assert out.shape == (30, 50, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, -1], viz.jet(np.array(1.0)))  # dark red
    np.testing.assert_array_equal(out[-1, 0], viz.jet(np.array(0.0)))  # dark blue
    assert out[0, -1, 0] > 100 and out[0, -1, 2] == 0 and out[-1, 0, 2] > 100
    np.testing.assert_array_equal(viz.jet(np.array([0.0, 0.5, 1.0])),
                                  [[0, 0, 128], [128, 255, 128], [128, 0, 0]])
    with_cap = viz.heatmap_overlay(img, rel, "cue")
    assert with_cap.shape[0] > 30
    with pytest.raises(ValueError, match="relevance"):
        viz.heatmap_overlay(img, np.zeros((2, 2, 2)))


def test_save_png_roundtrip(tmp_path) -> None:
    img = _image()
    p = viz.save_png(img, tmp_path / "deep" / "dir" / "x.png")
    np.testing.assert_array_equal(np.asarray(Image.open(p)), img)
    pm = viz.save_png(_rect_mask(), tmp_path / "m.png")
    assert np.asarray(Image.open(pm)).max() == 255
    with pytest.raises(ValueError, match="uint8"):
        viz.save_png(img.astype(np.float32), tmp_path / "bad.png")


def test_input_errors() -> None:
    with pytest.raises(ValueError, match="must match"):
        viz.overlay(_image(), np.zeros((5, 5), bool))
    with pytest.raises(ValueError, match="uint8"):
        viz.overlay(_image().astype(np.float32), _rect_mask())
