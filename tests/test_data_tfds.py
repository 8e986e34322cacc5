"""tfds_refcoco.py on a tiny ArrayRecord dataset with ref_coco_bv's feature layout."""

from __future__ import annotations

import io
import sys

import numpy as np
import PIL.Image
import pytest

from vipa_jax.data.refer import DataError
from vipa_jax.data.tfds_refcoco import TfdsRefCoco

tfds = pytest.importorskip("tensorflow_datasets")

H, W = 12, 16


def _png(a: np.ndarray) -> bytes:
    """Encoded PNG bytes (TFDS writes encoded images without TensorFlow)."""
    buf = io.BytesIO()
    PIL.Image.fromarray(a).save(buf, "png")
    return buf.getvalue()


def _mask(k: int) -> np.ndarray:
    """Object k's bool mask: a distinct rectangle."""
    m = np.zeros((H, W), bool)
    m[k : k + 3, 2 * k : 2 * k + 5] = True
    return m


def _image(i: int) -> np.ndarray:
    """Image i: a constant colour."""
    return np.full((H, W, 3), (40 * i, 100, 200), np.uint8)


# image id -> [(annotation id, [sentences])]
EXAMPLES = {7: [(70, ["left cat", "the cat"]), (71, ["dog"])], 8: [(80, ["a", "b", "c"])]}


class RefCocoBv(tfds.core.GeneratorBasedBuilder):
    """Mirror of big_vision's ref_coco_bv features (objects -> refs, PNG masks)."""

    VERSION = tfds.core.Version("1.4.0")
    # TFDS would look for this builder's source file through its undeclared
    # importlib_resources dependency when the builder lives in a package (tests/).
    code_path = None
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="refcoco_unc")]

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "id": tfds.features.Scalar(np.int32),
            "image": tfds.features.Image(encoding_format="png"),
            "height": tfds.features.Scalar(np.int32),
            "width": tfds.features.Scalar(np.int32),
            "file_name": tfds.features.Text(),
            "objects": tfds.features.Sequence({
                "id": tfds.features.Scalar(np.int64),
                "area": tfds.features.Scalar(np.float32),
                "bbox": tfds.features.BBoxFeature(),
                "mask": tfds.features.Image(encoding_format="png"),
                "category": tfds.features.ClassLabel(names=["cat", "dog"]),
                "iscrowd": tfds.features.Scalar(np.bool_),
                "refs": tfds.features.Sequence({
                    "id": tfds.features.Scalar(np.int32),
                    "sentence": tfds.features.Text(),
                }),
            }),
        }))

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples()}

    def _generate_examples(self):
        sid = 0
        for img_id, objs in EXAMPLES.items():
            objects = []
            for ann_id, sents in objs:
                refs = []
                for s in sents:
                    sid += 1
                    refs.append({"id": sid, "sentence": s})
                objects.append({
                    "id": ann_id, "area": 1.0, "bbox": tfds.features.BBox(0.1, 0.1, 0.5, 0.5),
                    "mask": _png(_mask(ann_id % 10)), "category": "cat", "iscrowd": False,
                    "refs": refs,
                })
            yield img_id, {
                "id": img_id, "image": _png(_image(img_id % 7)), "height": H, "width": W,
                "file_name": f"{img_id}.jpg", "objects": objects,
            }


class BoxesOnly(tfds.core.GeneratorBasedBuilder):
    """Stock ref_coco-like: objects without masks."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # see RefCocoBv

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="png"),
            "objects": tfds.features.Sequence({"bbox": tfds.features.BBoxFeature()}),
        }))

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples()}

    def _generate_examples(self):
        box = tfds.features.BBox(0.0, 0.0, 1.0, 1.0)
        yield 0, {"image": _png(_image(1)), "objects": [{"bbox": box}]}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """Builds both datasets once (ArrayRecord)."""
    d = tmp_path_factory.mktemp("tfds")
    # TFDS 4.9 serialises a nested Sequence via TensorInfo.dtype (a TF dtype) although the
    # numpy dtype suffices; building the real ref_coco_bv uses TF. Reading needs neither.
    feature_lib = tfds.core.features.feature
    mp = pytest.MonkeyPatch()
    mp.setattr(feature_lib.TensorInfo, "dtype", property(lambda self: self.np_dtype))
    try:
        for cls in (RefCocoBv, BoxesOnly):
            cls(data_dir=str(d), file_format="array_record").download_and_prepare()
    finally:
        mp.undo()
    return str(d)


def test_flattened_records_images_and_masks(tfds_dir):
    ds = TfdsRefCoco.from_names("refcoco", "unc", "val", data_dir=tfds_dir)
    assert len(ds) == 6 and len(ds.objects) == 3
    got = sorted((r.image_id, r.ann_id, r.sentence) for r in ds)
    want = sorted((i, a, s) for i, objs in EXAMPLES.items() for a, ss in objs for s in ss)
    assert got == want
    for i, r in enumerate(ds):
        assert (r.height, r.width, r.split) == (H, W, "validation")
        np.testing.assert_array_equal(ds.load_mask(i), _mask(r.ann_id % 10).astype(np.uint8))
        np.testing.assert_array_equal(ds.load_image(i), _image(r.image_id % 7))
    assert sorted(map(len, ds.objects)) == [1, 2, 3]
    assert repr(ds) == repr(TfdsRefCoco("ref_coco_bv/refcoco_unc", "validation", tfds_dir))
    assert "tensorflow" not in sys.modules


def test_pipeline_reads_tfds_records(tfds_dir, wordpiece):
    from vipa_jax.data import pipeline

    ds = TfdsRefCoco("ref_coco_bv/refcoco_unc", "validation", tfds_dir)
    (b,) = list(pipeline.make_eval_batches(
        ds, wordpiece, global_batch_size=8, image_size=8, shard_index=0, shard_count=1
    ))
    assert b["valid"].sum() == 6 and b["index"].tolist() == [0, 1, 2, 3, 4, 5, -1, -1]
    assert b["mask"][:6].sum(axis=(1, 2)).min() > 0


def test_maskless_builder_and_unknown_split_errors(tfds_dir):
    with pytest.raises(DataError, match="no per-object masks.*ref_coco_bv"):
        TfdsRefCoco("boxes_only", "validation", tfds_dir)
    with pytest.raises(DataError, match=r"unknown split 'testA'.*\['validation'\]"):
        TfdsRefCoco("ref_coco_bv/refcoco_unc", "testA", tfds_dir)
    with pytest.raises(DataError, match="unknown dataset 'refclef' for TFDS"):
        TfdsRefCoco.from_names("refclef", "unc", "val", data_dir=tfds_dir)
