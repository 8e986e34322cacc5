"""VIPA training losses: BCE + Dice on the mask, + λ·pixel-contrastive on the [CLS] relevance map.

Paper (VIPA, Cho et al.): total = BCE(mask) + Dice(mask) + λ·L_pc, where L_pc is a BCE between
the sigmoid of the [CLS] row of the VEG step-1 similarity S_c (upsampled to the mask size) and the
ground-truth mask. The Dice form is CGFormer's (`model/segmenter.py`): per sample
``1 - (2Σpt + 1) / (Σp + Σt + 1)`` on sigmoid probabilities, averaged over the batch; the BCE is
the mean over pixels (CGFormer's ``sigmoid_focal(alpha=-1, gamma=0)`` is exactly that).

Conventions
- All maths runs in float32, whatever the input dtype (bf16 logits are upcast first).
- ``valid`` (B,) marks real examples; padding examples (``valid=False``) are excluded from every
  term: their logits are replaced by 0 before any maths, so even NaN/inf padding cannot leak into
  the loss or its gradient. Each term is a mean over valid samples (0 when none is valid).
- Upsampling uses ``resize_bilinear_align_corners``: bilinear with PyTorch's
  ``F.interpolate(..., mode='bilinear', align_corners=True)`` semantics (LAVT/CrossVLT/CGFormer
  use it everywhere). ``jax.image.resize`` is half-pixel (align_corners=False), hence this helper.
  It accepts NumPy arrays too (and then stays in NumPy: no jit compile per shape).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from vipa_jax.models.layers import resize_bilinear_align_corners

Array = jax.Array


def _valid_weights(valid: Array | None, batch: int) -> Array:
    """(B,) float32 0/1 weights from an optional validity/weight vector."""
    if valid is None:
        return jnp.ones((batch,), jnp.float32)
    valid = jnp.asarray(valid)
    if valid.shape != (batch,):
        raise ValueError(f"valid must have shape ({batch},), got {valid.shape}")
    return valid.astype(jnp.float32)


def _masked_mean(per_sample: Array, w: Array) -> Array:
    """Σ w·x / Σ w over the batch, 0 when Σ w == 0; padded entries are selected out (not 0·NaN)."""
    total = jnp.sum(jnp.where(w > 0, per_sample * w, 0.0))
    denom = jnp.sum(w)
    return jnp.where(denom > 0, total / jnp.maximum(denom, 1e-12), 0.0)


def _prepare(logits: Array, target: Array, w: Array) -> tuple[Array, Array]:
    """Upcast to float32 and zero the logits/targets of padding samples (w == 0)."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {logits.shape} and target {target.shape} must match")
    if logits.ndim != 3:
        raise ValueError(f"expected (B, H, W) logits, got shape {logits.shape}")
    keep = (w > 0)[:, None, None]
    x = jnp.where(keep, jnp.asarray(logits).astype(jnp.float32), 0.0)
    t = jnp.where(keep, jnp.asarray(target).astype(jnp.float32), 0.0)
    return x, t


def bce_with_logits(logits: Array, target: Array) -> Array:
    """Elementwise stable BCE-with-logits: max(x,0) - x·t + log(1 + e^{-|x|}) (float32)."""
    x = jnp.asarray(logits).astype(jnp.float32)
    t = jnp.asarray(target).astype(jnp.float32)
    return jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))


def bce_loss(logits: Array, target: Array, weights: Array | None = None) -> Array:
    """Mean BCE-with-logits over pixels, averaged over valid samples (VIPA mask loss, BCE term).

    logits, target: (B, H, W) (target in {0, 1}); weights: optional (B,) validity -> scalar f32.
    With all samples valid this equals PyTorch's ``binary_cross_entropy_with_logits`` (mean).
    """
    w = _valid_weights(weights, logits.shape[0])
    x, t = _prepare(logits, target, w)
    per_sample = jnp.mean(bce_with_logits(x, t), axis=(1, 2))  # (B,)
    return _masked_mean(per_sample, w)


def dice_loss(logits: Array, target: Array, valid: Array | None = None) -> Array:
    """Per-sample 1 - (2Σpt + 1)/(Σp + Σt + 1) on p = sigmoid(logits), mean over valid (CGFormer).

    logits, target: (B, H, W); valid: optional (B,) -> scalar f32.
    """
    w = _valid_weights(valid, logits.shape[0])
    x, t = _prepare(logits, target, w)
    p = jax.nn.sigmoid(x)
    num = 2.0 * jnp.sum(p * t, axis=(1, 2)) + 1.0  # (B,)
    den = jnp.sum(p, axis=(1, 2)) + jnp.sum(t, axis=(1, 2)) + 1.0  # (B,)
    return _masked_mean(1.0 - num / den, w)


def pixel_contrastive_loss(
    cls_relevance_logits: Array, target: Array, valid: Array | None = None
) -> Array:
    """VIPA pixel-contrastive loss: BCE(sigmoid(upsampled [CLS] row of S_c), GT mask).

    cls_relevance_logits: (B, h, w) relevance logits of the [CLS] token over the visual tokens;
    target: (B, H, W) {0, 1}; valid: optional (B,). The map is bilinearly upsampled to (H, W)
    with align_corners=True (as CrossVLT's AlignLoss) -> scalar f32.
    """
    if cls_relevance_logits.ndim != 3 or target.ndim != 3:
        raise ValueError(
            f"expected (B, h, w) relevance and (B, H, W) target, got "
            f"{cls_relevance_logits.shape} and {target.shape}"
        )
    rel = jnp.asarray(cls_relevance_logits).astype(jnp.float32)
    up = resize_bilinear_align_corners(rel, target.shape[1:])  # (B, H, W)
    return bce_loss(up, target, valid)


def _cfg_get(cfg: Any, name: str) -> Any:
    """Read a field from a ConfigDict/dataclass (attribute) or a Mapping (item)."""
    if isinstance(cfg, Mapping):
        if name not in cfg:
            raise KeyError(f"loss config is missing field {name!r}")
        return cfg[name]
    if not hasattr(cfg, name):
        raise KeyError(f"loss config is missing field {name!r}")
    return getattr(cfg, name)


def vipa_loss(
    outputs: Mapping[str, Array], batch: Mapping[str, Array], cfg: Any
) -> tuple[Array, dict[str, Array]]:
    """VIPA objective: bce_weight·BCE + dice_weight·Dice + [contrastive] contrastive_weight·L_pc.

    outputs: ``logits`` (B, H, W) mask logits at the input size, ``cls_relevance`` (B, h, w)
    [CLS] relevance logits (needed only when ``cfg.contrastive``); batch: ``mask`` (B, H, W),
    optional ``valid`` (B,) bool; cfg: ``bce_weight``, ``dice_weight``, ``contrastive`` (bool,
    static), ``contrastive_weight`` (``c.loss`` in configs/base.py).
    Returns (total, parts) with parts ``bce``, ``dice``, ``contrastive`` (0 when off), ``total``.
    """
    if "logits" not in outputs:
        raise KeyError("vipa_loss: outputs must contain 'logits' (B, H, W)")
    if "mask" not in batch:
        raise KeyError("vipa_loss: batch must contain 'mask' (B, H, W)")
    logits, mask = outputs["logits"], batch["mask"]
    valid = batch.get("valid")
    bce = bce_loss(logits, mask, valid)
    dice = dice_loss(logits, mask, valid)
    total = _cfg_get(cfg, "bce_weight") * bce + _cfg_get(cfg, "dice_weight") * dice
    if bool(_cfg_get(cfg, "contrastive")):
        if outputs.get("cls_relevance") is None:
            raise KeyError(
                "vipa_loss: cfg.contrastive is on but outputs has no 'cls_relevance' "
                "(is VEG step 1 disabled? then set loss.contrastive=False)"
            )
        contrastive = pixel_contrastive_loss(outputs["cls_relevance"], mask, valid)
        total = total + _cfg_get(cfg, "contrastive_weight") * contrastive
    else:
        contrastive = jnp.zeros((), jnp.float32)
    total = jnp.asarray(total, jnp.float32)
    return total, {"bce": bce, "dice": dice, "contrastive": contrastive, "total": total}
