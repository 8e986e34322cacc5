"""Reader for the standard *refer* layout (RefCOCO, RefCOCO+, RefCOCOg and anything like them).

Layout (``lichengunc/refer``)::

    <root>/images/mscoco/images/train2014/COCO_train2014_*.jpg
    <root>/<dataset>/instances.json            # COCO images / annotations / categories
    <root>/<dataset>/refs(<split_by>).p         # pickled list of refs

A dataset is a random-access list of :class:`Expression` records, one per (object, sentence).
Masks are decoded lazily with pycocotools from polygons (several polygons = their union) or RLE
(compressed or uncompressed), as ``m > 0`` (pixels where an object's own polygons overlap stay
foreground, unlike ``REFER.getMask``'s count map).

Public interface used by the pipeline and the evaluation code:

* ``len(ds)``, ``ds[i] -> Expression`` (fields ``index, image_id, ref_id, ann_id, sent_id,
  sentence, split, height, width, image_path``),
* ``ds.load_image(i) -> uint8 (H, W, 3)`` RGB at the original size,
* ``ds.load_mask(i)`` / ``ds.original_mask(i) -> uint8 (H, W)`` in {0, 1} at the original size,
* ``ds.objects -> tuple[tuple[int, ...], ...]``: record indices grouped by object (ref), used by
  the training pipeline to draw one sentence per object per epoch,
* ``ds.skipped``: ``(what, reason)`` for every record dropped with ``on_error='skip'``,
* a deterministic ``repr`` (grain checks it when restoring a DataLoader).

Splits follow ``REFER.getRefIds``: ``train``/``val`` (and any other name) match exactly,
``testA``/``testB``/``testC`` match refs whose split contains that letter's test split, and
``test`` matches every split containing ``test``.

Errors: a missing ``refs(*).p`` or ``instances.json``, an unknown dataset folder or split raise
:class:`DataError` naming the file.  A missing image file, an annotation that is missing or
decodes to an empty mask raise :class:`DataError` naming the file and the record; with
``on_error='skip'`` such records are dropped, counted in ``ds.skipped`` and a warning is logged.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
from pycocotools import mask as mask_utils

log = logging.getLogger(__name__)

KNOWN_DATASETS = {
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
    "refclef": ("unc", "berkeley"),
}
COCO_IMAGE_DIR = os.path.join("images", "mscoco", "images", "train2014")
ON_ERROR = ("raise", "skip")


class DataError(ValueError):
    """A dataset file or record is missing, corrupt or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Expression:
    """One (object, sentence) pair; ``index`` is its position in the dataset."""

    index: int
    image_id: int
    ref_id: int
    ann_id: int
    sent_id: int
    sentence: str
    split: str
    height: int
    width: int
    image_path: str = ""

    def describe(self) -> str:
        """A short identification of the record for error messages."""
        return (
            f"record {self.index} (image_id={self.image_id}, ref_id={self.ref_id}, "
            f"ann_id={self.ann_id}, sent_id={self.sent_id}, sentence={self.sentence!r})"
        )


def check_on_error(on_error: str) -> str:
    """Validates an ``on_error`` policy name."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict:
    """COCO segmentation (polygon list, uncompressed or compressed RLE) -> one compressed RLE."""
    if isinstance(segmentation, list):
        if not segmentation:
            raise ValueError("empty polygon list")
        if isinstance(segmentation[0], dict):  # a list of RLEs
            rles = [segmentation_to_rle(s, height, width) for s in segmentation]
            return mask_utils.merge(rles)
        polys = [list(map(float, p)) for p in segmentation]
        if any(len(p) < 6 or len(p) % 2 for p in polys):
            raise ValueError("a polygon needs an even number (>= 6) of coordinates")
        return mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation:
        h, w = segmentation["size"]
        if (h, w) != (height, width):
            raise ValueError(f"RLE size {[h, w]} != image size {[height, width]}")
        if isinstance(segmentation["counts"], list):
            return mask_utils.frPyObjects(segmentation, h, w)
        counts = segmentation["counts"]
        return {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
    raise ValueError(f"unsupported segmentation type {type(segmentation).__name__}")


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO segmentation -> uint8 (height, width) mask in {0, 1}."""
    rle = segmentation_to_rle(segmentation, height, width)
    return (mask_utils.decode(rle) > 0).astype(np.uint8)


def load_rgb(data: str | bytes, what: str) -> np.ndarray:
    """Image path or encoded bytes -> uint8 RGB (H, W, 3); grayscale/CMYK/alpha converted."""
    try:
        src = io.BytesIO(data) if isinstance(data, bytes) else data
        with PIL.Image.open(src) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = PIL.Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = PIL.Image.alpha_composite(bg, im)
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as e:
        raise DataError(f"{what}: image file not found") from e
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises these on corrupt files
        raise DataError(f"{what}: cannot decode image ({e})") from e


class RefDataset(Sequence):
    """Base class: a list of :class:`Expression` plus image/mask loading and object grouping."""

    name: str = "dataset"

    def __init__(self, records: Sequence[Expression], split: str, on_error: str = "raise"):
        self.records = tuple(records)
        self.split = split
        self.on_error = check_on_error(on_error)
        self.skipped: list[tuple[str, str]] = getattr(self, "skipped", [])
        groups: dict[Any, list[int]] = {}
        for r in self.records:
            groups.setdefault(self.object_key(r), []).append(r.index)
        self.objects: tuple[tuple[int, ...], ...] = tuple(tuple(g) for g in groups.values())

    def object_key(self, record: Expression) -> Any:
        """The key grouping sentences of one object (a ref)."""
        return record.ref_id

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Expression:  # type: ignore[override]
        return self.records[i]

    def load_image(self, i: int) -> np.ndarray:
        """uint8 RGB (H, W, 3) image of record ``i`` at its original size."""
        raise NotImplementedError

    def load_mask(self, i: int) -> np.ndarray:
        """uint8 (H, W) {0, 1} ground-truth mask of record ``i`` at its original size."""
        raise NotImplementedError

    def original_mask(self, i: int) -> np.ndarray:
        """Alias of :meth:`load_mask` for the ``original`` evaluation protocol."""
        return self.load_mask(i)

    def _fail(self, message: str) -> None:
        """Raises, or (``on_error='skip'``) records the problem for the summary warning."""
        if self.on_error == "raise":
            raise DataError(message)
        self.skipped.append((message.split(":")[0], message))

    def _warn_skipped(self, what: str) -> None:
        """Logs one warning summarising the records skipped while reading."""
        if self.skipped:
            log.warning(
                "%s: skipped %d record(s) (on_error='skip'); first: %s",
                what, len(self.skipped), self.skipped[0][1],
            )


def split_matches(wanted: str, ref_split: str) -> bool:
    """``REFER.getRefIds`` split semantics."""
    if wanted in ("testA", "testB", "testC"):
        return wanted[-1] in ref_split and "test" in ref_split
    if wanted == "test":
        return "test" in ref_split
    return wanted == ref_split


class ReferDataset(RefDataset):
    """Expressions of one split of a refer-layout dataset (see the module docstring)."""

    def __init__(
        self,
        root: str,
        dataset: str = "refcoco",
        split_by: str = "unc",
        split: str = "train",
        on_error: str = "raise",
        image_dir: str | None = None,
    ):
        check_on_error(on_error)
        self.root, self.dataset, self.split_by = str(root), dataset, split_by
        self.name = dataset
        self.image_dir = os.path.join(self.root, image_dir or COCO_IMAGE_DIR)
        self.on_error = on_error
        self.skipped = []
        ds_dir = os.path.join(self.root, dataset)
        if not os.path.isdir(ds_dir):
            present = sorted(
                d for d in (os.listdir(self.root) if os.path.isdir(self.root) else [])
                if d != "images"
            )
            raise DataError(
                f"{ds_dir}: unknown dataset {dataset!r} (no such folder); known names: "
                f"{sorted(KNOWN_DATASETS)}; folders present under {self.root!r}: {present}"
            )
        self.refs_path = os.path.join(ds_dir, f"refs({split_by}).p")
        self.instances_path = os.path.join(ds_dir, "instances.json")
        refs = self._load_refs()
        images, anns = self._load_instances()
        available = sorted({r["split"] for r in refs})
        selected = [r for r in refs if split_matches(split, r["split"])]
        if not selected:
            raise DataError(
                f"{self.refs_path}: unknown split {split!r} for {dataset}({split_by}); "
                f"splits present: {available} (also 'test' = every test* split)"
            )
        self._anns = {}
        records: list[Expression] = []
        checked_images: dict[int, bool] = {}
        for ref in selected:
            records.extend(self._ref_records(ref, images, anns, len(records), checked_images))
        if not records:
            raise DataError(f"{self.refs_path}: split {split!r} has no usable expressions")
        super().__init__(records, split, on_error)
        self._warn_skipped(self.refs_path)

    def _load_refs(self) -> list[dict]:
        """Loads the pickled refs list (Python 2 pickles are read with latin1)."""
        if not os.path.isfile(self.refs_path):
            choices = sorted(
                f for f in os.listdir(os.path.dirname(self.refs_path)) if f.startswith("refs(")
            )
            raise DataError(f"{self.refs_path}: refs file not found; present: {choices}")
        try:
            with open(self.refs_path, "rb") as f:
                refs = pickle.load(f, encoding="latin1")
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt file
            raise DataError(f"{self.refs_path}: cannot unpickle refs ({e})") from e
        if not isinstance(refs, list):
            raise DataError(f"{self.refs_path}: expected a list of refs, got {type(refs)}")
        return refs

    def _load_instances(self) -> tuple[dict[int, dict], dict[int, dict]]:
        """Loads ``instances.json`` into image and annotation maps keyed by id."""
        if not os.path.isfile(self.instances_path):
            raise DataError(f"{self.instances_path}: instances file not found")
        try:
            with open(self.instances_path) as f:
                inst = json.load(f)
            images = {int(im["id"]): im for im in inst["images"]}
            anns = {int(a["id"]): a for a in inst["annotations"]}
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{self.instances_path}: malformed COCO instances ({e!r})") from e
        return images, anns

    def resolve_image(self, file_name: str) -> str:
        """The image path for an ``images[*].file_name``."""
        return os.path.join(self.image_dir, file_name)

    def _ref_records(
        self,
        ref: dict,
        images: dict[int, dict],
        anns: dict[int, dict],
        start: int,
        checked_images: dict[int, bool],
    ) -> list[Expression]:
        """Validates one ref and returns its expressions (empty when skipped)."""
        where = f"{self.refs_path}: ref_id={ref.get('ref_id')} ann_id={ref.get('ann_id')}"
        ann = anns.get(int(ref["ann_id"]))
        image = images.get(int(ref["image_id"]))
        if ann is None or image is None:
            missing = "annotation" if ann is None else f"image {ref['image_id']}"
            self._fail(f"{where}: {missing} not in {self.instances_path}")
            return []
        h, w = int(image["height"]), int(image["width"])
        try:
            rle = segmentation_to_rle(ann["segmentation"], h, w)
            area = int(mask_utils.area(rle))
        except (ValueError, KeyError, TypeError) as e:
            self._fail(f"{where}: cannot decode segmentation ({e})")
            return []
        if area == 0:
            self._fail(f"{where}: annotation decodes to an empty mask")
            return []
        path = self.resolve_image(image["file_name"])
        image_id = int(image["id"])
        if image_id not in checked_images:
            checked_images[image_id] = os.path.isfile(path)
        if not checked_images[image_id]:
            self._fail(f"{path}: image file not found ({where})")
            return []
        sentences = ref.get("sentences") or []
        if not sentences:
            self._fail(f"{where}: ref has no sentences")
            return []
        self._anns[int(ann["id"])] = (rle, h, w)
        return [
            Expression(
                index=start + k,
                image_id=image_id,
                ref_id=int(ref["ref_id"]),
                ann_id=int(ann["id"]),
                sent_id=int(s.get("sent_id", -1)),
                sentence=str(s.get("raw") or s.get("sent", "")),
                split=str(ref["split"]),
                height=h,
                width=w,
                image_path=path,
            )
            for k, s in enumerate(sentences)
        ]

    def load_image(self, i: int) -> np.ndarray:
        """uint8 RGB (H, W, 3) at the original size; checks it against ``instances.json``."""
        r = self.records[i]
        img = load_rgb(r.image_path, f"{r.image_path} ({r.describe()})")
        if img.shape[:2] != (r.height, r.width):
            raise DataError(
                f"{r.image_path} ({r.describe()}): image is {img.shape[1]}x{img.shape[0]}, "
                f"{self.instances_path} says {r.width}x{r.height}"
            )
        return img

    def load_mask(self, i: int) -> np.ndarray:
        """uint8 (H, W) {0, 1} mask at the original size."""
        rle, _, _ = self._anns[self.records[i].ann_id]
        return (mask_utils.decode(rle) > 0).astype(np.uint8)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={self.root!r}, dataset={self.dataset!r}, "
            f"split_by={self.split_by!r}, split={self.split!r}, n={len(self)}, "
            f"skipped={len(self.skipped)})"
        )
