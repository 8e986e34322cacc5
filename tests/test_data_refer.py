"""refer.py / referit.py on the tiny refer-layout fixture built in conftest."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import PIL.Image
import pytest

from tests.conftest import (
    REFER_H,
    REFER_W,
    SPLIT_COUNTS,
    TRAIN_OBJECTS,
    build_refer_fixture,
    expected_mask,
)
from vipa_jax.data.refer import DataError, ReferDataset
from vipa_jax.data.referit import ReferItDataset


@pytest.mark.parametrize("split", sorted(SPLIT_COUNTS))
def test_record_counts_per_split(refer_root, split):
    ds = ReferDataset(refer_root, "refcoco", "unc", split)
    assert len(ds) == SPLIT_COUNTS[split]
    assert [r.index for r in ds] == list(range(len(ds)))
    if split == "train":
        assert len(ds.objects) == TRAIN_OBJECTS
        assert sorted(len(o) for o in ds.objects) == [1, 1, 1, 2, 2, 2, 3, 3]


def test_masks_equal_independent_rasterisation(refer_root):
    seen = set()
    for split in ("train", "val", "testA", "testB"):
        ds = ReferDataset(refer_root, "refcoco", "unc", split)
        for i, r in enumerate(ds):
            m = ds.load_mask(i)
            assert m.dtype == np.uint8 and m.shape == (REFER_H, REFER_W)
            np.testing.assert_array_equal(m, expected_mask(r.ann_id))
            np.testing.assert_array_equal(ds.original_mask(i), m)
            seen.add(r.ann_id)
    assert seen == {1, 2, 3, 4, 5}  # polygon, multi-polygon, RLE, compressed RLE
    # the overlapping multi-part polygon is a union: 32 + 80 pixels minus the 8 overlap
    assert expected_mask(2).sum() == 32 + 80 - 8


def test_grayscale_and_cmyk_images_become_rgb(refer_root):
    ds = ReferDataset(refer_root, "refcoco", "unc", "test")
    img_dir = refer_root / "images" / "mscoco" / "images" / "train2014"
    by_image = {r.image_id: i for i, r in enumerate(ds)}
    assert PIL.Image.open(img_dir / "img3.jpg").mode == "CMYK"
    cmyk = ds.load_image(by_image[3])
    assert cmyk.shape == (REFER_H, REFER_W, 3) and cmyk.dtype == np.uint8
    reference = np.asarray(PIL.Image.open(img_dir / "img3.jpg").convert("RGB"))
    np.testing.assert_array_equal(cmyk, reference)
    val = ReferDataset(refer_root, "refcoco", "unc", "val")
    gray = val.load_image(0)
    assert gray.shape == (REFER_H, REFER_W, 3)
    np.testing.assert_array_equal(gray[..., 0], np.asarray(PIL.Image.open(img_dir / "img2.jpg")))
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


def test_sentences_and_fields(refer_root):
    ds = ReferDataset(refer_root, "refcoco", "unc", "testA")
    assert [r.sentence for r in ds] == ["object 4 ref 4 sentence 0", "object 4 ref 4 sentence 1"]
    assert {(r.ref_id, r.ann_id, r.split, r.height, r.width) for r in ds} == {
        (4, 4, "testA", REFER_H, REFER_W)
    }
    assert repr(ds) == repr(ReferDataset(refer_root, "refcoco", "unc", "testA"))
    assert "0x" not in repr(ds)


def test_missing_refs_file_unknown_split_and_dataset(refer_root):
    with pytest.raises(DataError, match=r"refs\(google\)\.p: refs file not found"):
        ReferDataset(refer_root, "refcoco", "google", "train")
    splits = r"\['testA', 'testB', 'train', 'val'\]"
    with pytest.raises(DataError, match=r"unknown split 'testC'.*" + splits):
        ReferDataset(refer_root, "refcoco", "unc", "testC")
    with pytest.raises(DataError, match=r"unknown dataset 'refcocoz'.*present.*\['refcoco'\]"):
        ReferDataset(refer_root, "refcocoz", "unc", "train")


def test_missing_image_raises_or_is_skipped_and_counted(refer_root):
    (refer_root / "images" / "mscoco" / "images" / "train2014" / "img2.jpg").unlink()
    with pytest.raises(DataError, match=r"img2\.jpg: image file not found.*ref_id=3"):
        ReferDataset(refer_root, "refcoco", "unc", "val")
    ds = ReferDataset(refer_root, "refcoco", "unc", "train", on_error="skip")
    assert len(ds) == SPLIT_COUNTS["train"] and ds.skipped == []  # img2 has no train refs
    with pytest.raises(DataError, match="no usable expressions"):
        ReferDataset(refer_root, "refcoco", "unc", "val", on_error="skip")


def test_empty_mask_annotation(refer_root, caplog):
    refs_path = refer_root / "refcoco" / "refs(unc).p"
    inst = refer_root / "refcoco" / "instances.json"
    flat = "[[1, 12, 30, 12, 30, 12, 1, 12]]"  # zero-height rectangle: an empty mask
    inst.write_text(inst.read_text().replace("[[1, 12, 30, 12, 30, 22, 1, 22]]", flat))
    with pytest.raises(DataError, match=r"ref_id=5 ann_id=5: annotation decodes to an empty mask"):
        ReferDataset(refer_root, "refcoco", "unc", "testB")
    with caplog.at_level("WARNING"):
        ds = ReferDataset(refer_root, "refcoco", "unc", "train", on_error="skip")
    # refs 8 (2 sentences) and 11 (1 sentence) use annotation 5
    assert len(ds) == SPLIT_COUNTS["train"] - 3
    assert len(ds.skipped) == 2 and "skipped 2 record(s)" in caplog.text
    assert str(refs_path) in ds.skipped[0][1]


def test_corrupt_image_error_names_file_and_record(refer_root):
    path = refer_root / "images" / "mscoco" / "images" / "train2014" / "img1.jpg"
    path.write_bytes(b"not a jpeg")
    ds = ReferDataset(refer_root, "refcoco", "unc", "train")
    msg = r"img1\.jpg \(record 0 \(image_id=1, ref_id=1.*cannot decode"
    with pytest.raises(DataError, match=msg):
        ds.load_image(0)


def test_refs_pickle_with_latin1_and_bad_pickle(refer_root):
    p = refer_root / "refcoco" / "refs(unc).p"
    p.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"refs\(unc\)\.p: cannot unpickle"):
        ReferDataset(refer_root, "refcoco", "unc", "train")


def test_referit_nested_saiapr_layout(tmp_path):
    root = build_refer_fixture(tmp_path / "r", dataset="refclef", image_dir="images/saiapr_tc-12")
    sa = root / "images" / "saiapr_tc-12"
    # move img1 to the original IAPR TC-12 tree: <NN>/images/<name>, with a numeric name
    inst = root / "refclef" / "instances.json"
    inst.write_text(inst.read_text().replace('"img1.jpg"', '"25001.jpg"'))
    (sa / "25" / "images").mkdir(parents=True)
    shutil.move(sa / "img1.jpg", sa / "25" / "images" / "25001.jpg")
    ds = ReferItDataset(root, split_by="unc", split="train")
    assert len(ds) == SPLIT_COUNTS["train"]
    i = next(i for i, r in enumerate(ds) if r.image_id == 1)
    assert ds[i].image_path.endswith("saiapr_tc-12/25/images/25001.jpg")
    assert ds.load_image(i).shape == (REFER_H, REFER_W, 3)
    np.testing.assert_array_equal(ds.load_mask(i), expected_mask(ds[i].ann_id))
    assert "dataset='refclef'" in repr(ds)
    assert pickle.loads(pickle.dumps(ds)).records == ds.records
