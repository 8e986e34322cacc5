"""RefCOCO/+/g from a prepared TFDS builder (ArrayRecord), read without TensorFlow.

Only builders that carry **masks** work: big_vision's ``ref_coco_bv`` (v1.1.0+, per-object
PNG masks from ``coco.annToMask``).  The stock TFDS ``ref_coco`` holds boxes only and is
rejected with a clear error.  Configs: ``refcoco_unc``, ``refcoco_google``,
``refcocoplus_unc``, ``refcocog_umd``, ``refcocog_google``, ``refcocox_combined``; splits
``train``, ``validation`` (alias ``val``), ``test``, ``testA``, ``testB`` and their ``*_flat``
versions.

TFDS stores one example per image (objects -> refs); :class:`TfdsRefCoco` flattens it to one
record per (object, sentence) by parsing the serialized examples with TFDS's numpy parser
(image and mask bytes stay encoded while indexing) and decodes the image/mask with PIL only
when a record is loaded.  ``ref_id`` is the COCO annotation id (refs are one per annotation).

One-time build (needs TensorFlow, e.g. ``pip install 'vipa_jax[tfds-build]'``, and the
manual downloads listed in big_vision's builder)::

    git clone https://github.com/google-research/big_vision
    cd big_vision/big_vision/datasets/refcoco
    TFDS_DATA_DIR=~/tensorflow_datasets tfds build --file_format=array_record \\
        --manual_dir=/tmp/tfds/downloads/manual --config=refcoco_unc refcoco.py

then set ``config.data.source='tfds'`` and ``config.data.root`` to the TFDS data dir.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import PIL.Image

from vipa_jax.data.refer import DataError, Expression, RefDataset, check_on_error, load_rgb

DATASET_TO_TFDS = {"refcoco": "refcoco", "refcoco+": "refcocoplus", "refcocog": "refcocog",
                   "refcocox": "refcocox"}
SPLIT_ALIASES = {"val": "validation"}


class TfdsRefCoco(RefDataset):
    """Per-expression records of one split of a TFDS RefCOCO builder with masks."""

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | None = None,
        on_error: str = "raise",
    ):
        import tensorflow_datasets as tfds

        check_on_error(on_error)
        self.tfds_name, self.data_dir = name, data_dir
        self.tfds_split = SPLIT_ALIASES.get(split, split)
        self.on_error, self.skipped = on_error, []
        where = f"TFDS {name!r} in {data_dir or '$TFDS_DATA_DIR'}"
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # noqa: BLE001 - tfds raises many types for a missing dataset
            raise DataError(f"{where}: cannot open the prepared dataset ({e})") from e
        features = builder.info.features
        objects = features["objects"] if "objects" in features else None
        if objects is None or "mask" not in objects.feature:
            raise DataError(
                f"{where}: builder has no per-object masks (the stock TFDS 'ref_coco' stores "
                "boxes only); build big_vision's 'ref_coco_bv' instead (see this module's doc)"
            )
        if self.tfds_split not in builder.info.splits:
            raise DataError(
                f"{where}: unknown split {split!r}; splits present: "
                f"{sorted(builder.info.splits.keys())}"
            )
        self._features = features
        self._source = None
        records: list[Expression] = []
        self._locations: list[tuple[int, int]] = []
        for ex_index in range(len(self.source)):
            ex = self._parse(ex_index)
            objs = ex["objects"]
            for j, ann_id in enumerate(np.asarray(objs["id"]).tolist()):
                for sent_id, sentence in zip(
                    np.asarray(objs["refs"]["id"][j]).tolist(),
                    objs["refs"]["sentence"][j],
                    strict=True,
                ):
                    records.append(Expression(
                        index=len(records),
                        image_id=int(ex["id"]),
                        ref_id=int(ann_id),
                        ann_id=int(ann_id),
                        sent_id=int(sent_id),
                        sentence=_text(sentence),
                        split=self.tfds_split,
                        height=int(ex["height"]),
                        width=int(ex["width"]),
                        image_path=_text(ex.get("file_name", b"")),
                    ))
                    self._locations.append((ex_index, j))
        if not records:
            raise DataError(f"{where}: split {split!r} has no expressions")
        super().__init__(records, split, on_error)

    @classmethod
    def from_names(
        cls,
        dataset: str,
        split_by: str,
        split: str,
        data_dir: str | None = None,
        builder: str = "ref_coco_bv",
        on_error: str = "raise",
    ) -> TfdsRefCoco:
        """``('refcoco+', 'unc', 'val')`` -> ``ref_coco_bv/refcocoplus_unc``, split validation."""
        if dataset not in DATASET_TO_TFDS:
            raise DataError(
                f"unknown dataset {dataset!r} for TFDS; known: {sorted(DATASET_TO_TFDS)}"
            )
        name = f"{builder}/{DATASET_TO_TFDS[dataset]}_{split_by}"
        return cls(name, split, data_dir=data_dir, on_error=on_error)

    @property
    def source(self) -> Any:
        """The ArrayRecord data source of raw serialized examples (opened lazily)."""
        if self._source is None:
            import tensorflow_datasets as tfds

            self._source = tfds.data_source(
                self.tfds_name,
                split=self.tfds_split,
                data_dir=self.data_dir,
                download=False,
                deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
            )
        return self._source

    def _parse(self, ex_index: int) -> dict:
        """Parses one serialized example to numpy without decoding images/masks."""
        from tensorflow_datasets.core import example_parser

        parser = example_parser.ExampleParserNp(self._features.get_serialized_info())
        try:
            return parser.parse_example(self.source[ex_index])
        except Exception as e:  # noqa: BLE001 - corrupt record bytes
            raise DataError(
                f"{self._where()}: example {ex_index} cannot be parsed ({e!r})"
            ) from e

    def _where(self) -> str:
        """Dataset location for error messages."""
        return f"TFDS {self.tfds_name}[{self.tfds_split}] in {self.data_dir or '$TFDS_DATA_DIR'}"

    def load_image(self, i: int) -> np.ndarray:
        """uint8 RGB (H, W, 3) at the original size."""
        r = self.records[i]
        ex = self._parse(self._locations[i][0])
        return load_rgb(bytes(ex["image"]), f"{self._where()} {r.describe()}")

    def load_mask(self, i: int) -> np.ndarray:
        """uint8 (H, W) {0, 1} mask at the original size (from the stored PNG)."""
        r = self.records[i]
        ex_index, j = self._locations[i]
        png = self._parse(ex_index)["objects"]["mask"][j]
        try:
            with PIL.Image.open(io.BytesIO(bytes(png))) as im:
                m = np.asarray(im)
        except (OSError, ValueError) as e:
            raise DataError(f"{self._where()} {r.describe()}: cannot decode mask ({e})") from e
        m = (m.max(axis=-1) if m.ndim == 3 else m) > 0
        if not m.any():
            raise DataError(f"{self._where()} {r.describe()}: empty mask")
        return m.astype(np.uint8)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_source"] = None  # reopened lazily in the worker
        return state

    def __repr__(self) -> str:
        return (
            f"TfdsRefCoco(name={self.tfds_name!r}, split={self.tfds_split!r}, "
            f"data_dir={os.fspath(self.data_dir) if self.data_dir else None!r}, n={len(self)})"
        )


def _text(x: Any) -> str:
    """TFDS text (bytes) -> str."""
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)
