"""Visualisation of RIS predictions: tinted mask + outline, relevance heatmaps, caption strips.

In the spirit of LAVT's ``demo_inference.py`` (red overlay of the predicted mask) plus a caption
strip carrying the referring expression, and a jet heatmap for VIPA's [CLS] relevance map
(VEG step 1, S_c). Pure NumPy + Pillow (PIL's default font), no matplotlib.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vipa_jax.losses import resize_bilinear_align_corners

Color = tuple[int, int, int]


def _check_image(image: np.ndarray) -> np.ndarray:
    """Validate an (H, W, 3) uint8 image."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    return image


def _blend(base: np.ndarray, top: np.ndarray, alpha: float) -> np.ndarray:
    """(1 - alpha)·base + alpha·top, rounded to uint8."""
    out = (1.0 - alpha) * base.astype(np.float32) + alpha * np.asarray(top, np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def mask_outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Inner border of a bool (H, W) mask: mask & ~erode(mask, 4-neighbourhood, ``width`` times)."""
    mask = np.asarray(mask, bool)
    eroded = mask.copy()
    for _ in range(max(int(width), 0)):
        p = np.pad(eroded, 1, constant_values=False)
        eroded = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~eroded


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font at ``size`` px (falls back to the fixed bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, ImportError, OSError):
        return ImageFont.load_default()


def _wrap(text: str, draw: ImageDraw.ImageDraw, font: object, max_width: float) -> list[str]:
    """Greedy word wrap to ``max_width`` px; words longer than a line are split by characters."""
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        line = ""
        for word in para.split():
            cand = f"{line} {word}" if line else word
            if draw.textlength(cand, font=font) <= max_width:
                line = cand
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in word:  # a single word wider than the line
                if line and draw.textlength(line + ch, font=font) > max_width:
                    lines.append(line)
                    line = ""
                line += ch
        lines.append(line)
    return lines


def add_caption(image: np.ndarray, caption: str, font_size: int | None = None) -> np.ndarray:
    """Append a white strip with ``caption`` (wrapped, black text) below (H, W, 3) -> (H', W, 3)."""
    image = _check_image(image)
    h, w = image.shape[:2]
    size = font_size or max(12, w // 32)
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(2, size // 3)
    lines = _wrap(caption, probe, font, max(w - 2 * pad, 1))
    bbox = probe.textbbox((0, 0), "Ag", font=font)
    line_h = int(bbox[3] - bbox[1]) + max(2, size // 4)
    strip = Image.new("RGB", (w, 2 * pad + line_h * len(lines)), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * line_h - bbox[1]), line, fill=(0, 0, 0), font=font)
    return np.concatenate([image, np.asarray(strip, np.uint8)], axis=0)


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    caption: str | None = None,
    color: Color = (255, 0, 0),
    alpha: float = 0.5,
    outline_width: int | None = None,
) -> np.ndarray:
    """Tint ``mask`` on ``image``, draw its outline, add the caption strip -> uint8 (H', W, 3).

    image: (H, W, 3) uint8; mask: (H, W) bool. Pixels outside the mask are unchanged; inside
    they become (1-alpha)·image + alpha·color, and the mask's inner border is drawn in ``color``.
    """
    image = _check_image(image)
    mask = np.asarray(mask).astype(bool)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} must match the image's (H, W) {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = image.copy()
    out[mask] = _blend(image[mask], np.asarray(color, np.float32)[None], alpha)
    width = outline_width if outline_width is not None else max(1, min(image.shape[:2]) // 200)
    out[mask_outline(mask, width)] = np.asarray(color, np.uint8)
    return add_caption(out, caption) if caption else out


def jet(x: np.ndarray) -> np.ndarray:
    """Jet-like colormap: x in [0, 1] (...,) -> uint8 (..., 3) (blue -> cyan -> yellow -> red)."""
    x = np.clip(np.asarray(x, np.float32), 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], np.float32)  # R, G, B peaks
    rgb = np.clip(1.5 - np.abs(4.0 * (x - centres)), 0.0, 1.0)
    return np.rint(255.0 * rgb).astype(np.uint8)


def heatmap_overlay(
    image: np.ndarray,
    relevance: np.ndarray,
    caption: str | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blend a jet heatmap of ``relevance`` (h, w) (min-max normalised, bilinearly upsampled with
    align_corners to the image) over ``image`` (H, W, 3) uint8, plus caption -> uint8 (H', W, 3).
    """
    image = _check_image(image)
    rel = np.asarray(relevance, np.float32)
    if rel.ndim != 2:
        raise ValueError(f"relevance must be (h, w), got {rel.shape}")
    if not np.all(np.isfinite(rel)):
        raise ValueError("relevance contains NaN/inf")
    up = resize_bilinear_align_corners(rel, image.shape[:2])  # (H, W)
    lo, hi = float(up.min()), float(up.max())
    norm = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
    out = _blend(image, jet(norm), alpha)
    return add_caption(out, caption) if caption else out


def save_png(array: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Save an (H, W, 3) / (H, W) uint8 or bool array as PNG, creating parent folders."""
    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"expected (H, W[, 3]) uint8/bool, got {arr.shape} {arr.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")
    return path
