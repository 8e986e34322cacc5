"""Referring-segmentation metrics: oIoU, mIoU, P@{0.5..0.9}, streamed and shardable.

Conventions (all expressions = every (object, sentence) pair of a split):
- **oIoU** (overall IoU) = Σ_e I_e / Σ_e U_e over all expressions (LAVT/CrossVLT ``cum_I/cum_U``).
- **mIoU** = mean over expressions of IoU_e = I_e / U_e. An expression whose prediction *and*
  ground truth are both empty (U_e = 0) gets IoU ``empty_iou`` = **1.0 by default** (a correct
  "nothing here" answer, as ReLA/GRES counts it). LAVT's ``test.py`` counts it as 0; pass
  ``empty_iou=0.0`` to reproduce that. It never changes oIoU (it adds 0 to both sums). RefCOCO*
  masks are never empty, so the choice only matters for synthetic/generalised data.
- **P@X** = fraction of expressions with IoU **≥** X (LAVT's ``iou >= t``; CGFormer uses strict
  ``>``), X ∈ {0.5, 0.6, 0.7, 0.8, 0.9}.
- ``result()`` returns fractions in [0, 1]; the markdown table prints percentages.

Protocols (always reported next to the numbers):
- ``lavt``: predict at the network resolution (480×480: ``logits > 0``, i.e. sigmoid > 0.5, the
  1-logit equivalent of LAVT's 2-class argmax) and compare with the ground truth resized to that
  resolution (nearest). This is what LAVT/CrossVLT ``test.py`` report.
- ``original``: bilinearly upsample the *logits* (align_corners=True, as LAVT/CGFormer upsample)
  to the original image size, threshold at 0, compare with the full-resolution mask. (CGFormer
  upsamples sigmoid probabilities bicubically and thresholds at 0.5; we stay bilinear on logits.)

Streaming/sharding: ``iou_stats`` is a pure jit-able function of one batch that returns only
*sums* (intersection, union, Σ IoU, count, hits per threshold), so batches, devices and hosts
combine by addition: ``jax.lax.psum(stats, axis)`` inside ``shard_map``/``pmap``, or nothing at
all inside a ``jit`` over a globally sharded batch (the batch reduction is already global).
Per-batch sums are int32 (exact up to 2^31 pixels per batch); ``RISMetrics`` accumulates on the
host in int64/float64, so whole-split totals cannot overflow.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vipa_jax.losses import resize_bilinear_align_corners

Array = jax.Array
THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
PROTOCOLS: tuple[str, ...] = ("lavt", "original")
PROTOCOL_DESCRIPTIONS: dict[str, str] = {
    "lavt": "prediction at the network resolution vs. the GT resized to it (LAVT test.py)",
    "original": "logits bilinearly upsampled (align_corners) to the original image size, > 0, "
    "vs. the full-resolution GT",
}
STAT_KEYS: tuple[str, ...] = ("intersection", "union", "iou_sum", "count", "hits")


def _check_masks(pred: Any, gt: Any) -> None:
    """Raise a clear error unless pred/gt are (B, H, W) of the same shape."""
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must both be (B, H, W)")


def _per_sample(xp: Any, pred: Any, gt: Any, empty_iou: float) -> tuple[Any, Any, Any]:
    """Per-sample (I, U, IoU): I, U int counts (B,), IoU float (B,) with U == 0 -> empty_iou."""
    p = pred.astype(bool)
    g = gt.astype(bool)
    itype = xp.int64 if xp is np else xp.int32
    ftype = xp.float64 if xp is np else xp.float32
    inter = xp.sum(p & g, axis=(1, 2), dtype=itype)  # (B,)
    union = xp.sum(p | g, axis=(1, 2), dtype=itype)  # (B,)
    safe = xp.maximum(union, 1).astype(ftype)
    iou = xp.where(union > 0, inter.astype(ftype) / safe, ftype(empty_iou))  # (B,)
    return inter, union, iou


def _stats(
    xp: Any, pred: Any, gt: Any, valid: Any, thresholds: Sequence[float], empty_iou: float
) -> dict[str, Any]:
    """Shared NumPy/jax.numpy implementation of ``iou_stats``."""
    _check_masks(pred, gt)
    b = pred.shape[0]
    inter, union, iou = _per_sample(xp, pred, gt, empty_iou)
    if valid is None:
        v = xp.ones((b,), bool)
    else:
        v = xp.asarray(valid).astype(bool)
        if v.shape != (b,):
            raise ValueError(f"valid must have shape ({b},), got {v.shape}")
    itype = inter.dtype
    zero_i = xp.zeros((), itype)
    th = xp.asarray(np.asarray(thresholds, np.float64).astype(iou.dtype))  # (T,)
    hits = (iou[:, None] >= th[None, :]) & v[:, None]  # (B, T)
    return {
        "intersection": xp.sum(xp.where(v, inter, zero_i)),
        "union": xp.sum(xp.where(v, union, zero_i)),
        "iou_sum": xp.sum(xp.where(v, iou, 0.0)),
        "count": xp.sum(v.astype(itype)),
        "hits": xp.sum(hits.astype(itype), axis=0),  # (T,)
    }


def iou_stats(
    pred: Array,
    gt: Array,
    valid: Array | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
    empty_iou: float = 1.0,
) -> dict[str, Array]:
    """Jit-able per-batch metric sums for oIoU/mIoU/P@X (all entries add across batches/devices).

    pred, gt: (B, H, W) bool (or {0,1}); valid: optional (B,) bool, False = padding (ignored).
    Returns intersection, union, count (int32 scalars), iou_sum (float32), hits (T,) int32 with
    hits[k] = #valid samples with IoU ≥ thresholds[k].
    """
    return _stats(jnp, jnp.asarray(pred), jnp.asarray(gt), valid, thresholds, empty_iou)


def iou_stats_numpy(
    pred: np.ndarray,
    gt: np.ndarray,
    valid: np.ndarray | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
    empty_iou: float = 1.0,
) -> dict[str, np.ndarray]:
    """Host (NumPy, int64/float64) twin of ``iou_stats``; same keys and meaning."""
    return _stats(np, np.asarray(pred), np.asarray(gt), valid, thresholds, empty_iou)


def sample_ious(pred: Any, gt: Any, empty_iou: float = 1.0) -> Any:
    """Per-expression IoU (B,) of (B, H, W) masks (jnp/NumPy in, same out); U = 0 -> empty_iou."""
    _check_masks(pred, gt)
    xp = np if isinstance(pred, np.ndarray) and isinstance(gt, np.ndarray) else jnp
    return _per_sample(xp, xp.asarray(pred), xp.asarray(gt), empty_iou)[2]


def upsample_logits_to(logits: Any, size: Sequence[int]) -> Any:
    """Bilinear (align_corners=True) upsampling of (..., h, w) logits to (..., H, W), float32.

    NumPy in -> NumPy out (no per-shape jit compile: original sizes vary per image); jax in ->
    jax out. Threshold the result at 0 for the ``original`` protocol.
    """
    if isinstance(logits, np.ndarray):
        return resize_bilinear_align_corners(logits.astype(np.float32), size)
    return resize_bilinear_align_corners(jnp.asarray(logits).astype(jnp.float32), size)


class RISMetrics:
    """Host-side accumulator of ``iou_stats`` sums -> oIoU, mIoU, P@X for one split/protocol."""

    def __init__(
        self,
        protocol: str = "lavt",
        thresholds: Sequence[float] = THRESHOLDS,
        empty_iou: float = 1.0,
        keep_per_sample: bool = False,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.protocol = protocol
        self.thresholds = tuple(float(t) for t in thresholds)
        self.empty_iou = float(empty_iou)
        self.keep_per_sample = keep_per_sample
        self.intersection = 0  # Python ints: exact, no overflow
        self.union = 0
        self.count = 0
        self.iou_sum = 0.0
        self.hits = np.zeros(len(self.thresholds), np.int64)
        # (id or None, IoU) per valid expression, in update order, when keep_per_sample.
        self.per_sample: list[tuple[Any, float]] = []

    # -- accumulation ---------------------------------------------------------------------------
    def update(
        self,
        stats: Mapping[str, Any],
        ious: Any | None = None,
        valid: Any | None = None,
        ids: Sequence[Any] | None = None,
    ) -> RISMetrics:
        """Add one batch of ``iou_stats`` sums (device arrays are fetched) and per-sample IoUs.

        ious: (B,) from ``sample_ious`` with ``valid`` (B,) and ``ids`` (B,) when per-sample
        values are kept (ignored otherwise).
        """
        missing = [k for k in STAT_KEYS if k not in stats]
        if missing:
            raise KeyError(f"stats is missing {missing}; expected the keys of iou_stats()")
        s = jax.device_get(dict(stats))
        hits = np.asarray(s["hits"], np.int64)
        if hits.shape != self.hits.shape:
            raise ValueError(
                f"stats has {hits.shape[0] if hits.ndim else 0} thresholds, "
                f"this accumulator has {len(self.thresholds)}"
            )
        self.intersection += int(s["intersection"])
        self.union += int(s["union"])
        self.count += int(s["count"])
        self.iou_sum += float(s["iou_sum"])
        self.hits += hits
        if self.keep_per_sample and ious is not None:
            self._add_per_sample(np.asarray(jax.device_get(ious), np.float64), valid, ids)
        return self

    def _add_per_sample(
        self, ious: np.ndarray, valid: Any | None, ids: Sequence[Any] | None
    ) -> None:
        """Record (id, IoU) for the valid samples of a batch."""
        v = np.ones(ious.shape[0], bool) if valid is None else np.asarray(valid, bool)
        if ids is not None and len(ids) != ious.shape[0]:
            raise ValueError(f"ids has {len(ids)} entries for a batch of {ious.shape[0]}")
        for j in np.flatnonzero(v):
            self.per_sample.append((None if ids is None else ids[j], float(ious[j])))

    def update_numpy(
        self,
        pred: np.ndarray,
        gt: np.ndarray,
        valid: np.ndarray | None = None,
        ids: Sequence[Any] | None = None,
    ) -> RISMetrics:
        """Score (B, H, W) boolean predictions against (B, H, W) GT on the host."""
        pred, gt = np.asarray(pred), np.asarray(gt)
        stats = iou_stats_numpy(pred, gt, valid, self.thresholds, self.empty_iou)
        ious = sample_ious(pred, gt, self.empty_iou) if self.keep_per_sample else None
        return self.update(stats, ious, valid, ids)

    def update_original(
        self,
        logits: Any,
        gt_masks: Sequence[np.ndarray],
        valid: Any | None = None,
        ids: Sequence[Any] | None = None,
    ) -> RISMetrics:
        """``original`` protocol: upsample each (h, w) logit map to its GT's (H_i, W_i), > 0, score.

        logits: (B, h, w) at the network resolution; gt_masks: B full-resolution (H_i, W_i) masks.
        """
        logits = np.asarray(jax.device_get(logits), np.float32)
        if logits.ndim != 3 or len(gt_masks) != logits.shape[0]:
            raise ValueError(
                f"need (B, h, w) logits and B masks, got {logits.shape} and {len(gt_masks)}"
            )
        v = np.ones(len(gt_masks), bool) if valid is None else np.asarray(valid, bool)
        for j, gt in enumerate(gt_masks):
            if not v[j]:
                continue
            gt = np.asarray(gt).astype(bool)
            pred = upsample_logits_to(logits[j], gt.shape) > 0
            self.update_numpy(pred[None], gt[None], None, None if ids is None else [ids[j]])
        return self

    def merge(self, other: RISMetrics) -> RISMetrics:
        """Add another accumulator (same protocol/thresholds/empty_iou) into this one."""
        if (other.protocol, other.thresholds, other.empty_iou) != (
            self.protocol, self.thresholds, self.empty_iou
        ):
            raise ValueError(
                "cannot merge accumulators with different protocol/thresholds/empty_iou: "
                f"{(self.protocol, self.thresholds, self.empty_iou)} vs "
                f"{(other.protocol, other.thresholds, other.empty_iou)}"
            )
        self.intersection += other.intersection
        self.union += other.union
        self.count += other.count
        self.iou_sum += other.iou_sum
        self.hits = self.hits + other.hits
        self.per_sample.extend(other.per_sample)
        return self

    # -- results --------------------------------------------------------------------------------
    def result(self) -> dict[str, Any]:
        """{oIoU, mIoU, P@0.5..P@0.9 (fractions; NaN when empty), count, protocol}."""
        nan = float("nan")
        out: dict[str, Any] = {
            "oIoU": self.intersection / self.union if self.union > 0 else nan,
            "mIoU": self.iou_sum / self.count if self.count > 0 else nan,
        }
        for t, h in zip(self.thresholds, self.hits, strict=True):
            out[f"P@{t:g}"] = int(h) / self.count if self.count > 0 else nan
        out["count"] = self.count
        out["protocol"] = self.protocol
        return out

    def save_per_sample_csv(self, path: str | os.PathLike[str]) -> None:
        """Write ``id,iou`` rows (needs keep_per_sample=True)."""
        if not self.keep_per_sample:
            raise ValueError("per-sample IoUs were not kept: construct with keep_per_sample=True")
        _makedirs_for(path)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "iou"])
            for i, (key, iou) in enumerate(self.per_sample):
                w.writerow([i if key is None else key, f"{iou:.6f}"])


def _makedirs_for(path: str | os.PathLike[str]) -> None:
    """Create the parent folder of ``path`` if needed."""
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)


def _fmt_pct(x: Any) -> str:
    """Fraction -> percentage with 2 decimals ('—' for NaN/missing)."""
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "—"
    return f"{100.0 * float(x):.2f}"


def results_table_markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table of {split: result()} with the protocol on every row and explained below."""
    if not results:
        raise ValueError("results is empty")
    pkeys: list[str] = []
    for r in results.values():
        for k in r:
            if k.startswith("P@") and k not in pkeys:
                pkeys.append(k)
    header = ["split", "protocol", "oIoU", "mIoU", *pkeys, "count"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    protocols: list[str] = []
    for split, r in results.items():
        proto = str(r.get("protocol", "?"))
        if proto not in protocols:
            protocols.append(proto)
        row = [str(split), proto, _fmt_pct(r.get("oIoU")), _fmt_pct(r.get("mIoU"))]
        row += [_fmt_pct(r.get(k)) for k in pkeys]
        row.append(str(r.get("count", "")))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Values in %. oIoU = ΣI/ΣU; mIoU = mean per-expression IoU; P@X = IoU ≥ X.")
    for p in protocols:
        lines.append(f"Protocol `{p}`: {PROTOCOL_DESCRIPTIONS.get(p, 'unknown protocol')}.")
    return "\n".join(lines) + "\n"


def to_jsonable(x: Any) -> Any:
    """NumPy/jax scalars and arrays -> plain Python for json.dump."""
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return to_jsonable(np.asarray(x).tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None  # strict JSON has no NaN
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)  # anything else (e.g. a dtype) by its name


def save_results(
    results: Mapping[str, Mapping[str, Any]],
    json_path: str | os.PathLike[str],
    md_path: str | os.PathLike[str] | None = None,
) -> str:
    """Write {split: result()} as JSON (fractions) and the markdown table; return the table."""
    _makedirs_for(json_path)
    with open(json_path, "w") as f:
        json.dump(to_jsonable(results), f, indent=2, sort_keys=False)
        f.write("\n")
    table = results_table_markdown(results)
    if md_path is not None:
        _makedirs_for(md_path)
        with open(md_path, "w") as f:
            f.write(table)
    return table
