"""Synthetic generator: determinism, refer-layout read-back, unseen split, expression validity."""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from pathlib import Path

import numpy as np

from vipa_jax.data import synthetic
from vipa_jax.data.refer import ReferDataset

SPLITS = ("train", "val", "testA", "testB", "unseen")


def _digest(root: Path) -> str:
    """Hash of every file under ``root`` (names and bytes)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_deterministic_and_read_back_by_refer(tmp_path):
    a = synthetic.generate(str(tmp_path / "a"), num_images=60, image_size=64, seed=3)
    b = synthetic.generate(str(tmp_path / "b"), num_images=60, image_size=64, seed=3)
    c = synthetic.generate(str(tmp_path / "c"), num_images=60, image_size=64, seed=4)
    assert a == b and _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c") and a != c
    total = 0
    for split in SPLITS:
        ds = ReferDataset(tmp_path / "a", synthetic.DATASET_NAME, synthetic.SPLIT_BY, split)
        assert len(ds) == a[split] and ds.skipped == []
        total += len(ds)
        m = ds.load_mask(0)
        im = ds.load_image(0)
        assert im.shape == (64, 64, 3) and m.shape == (64, 64)
        assert 30 < m.sum() < 0.5 * 64 * 64  # smallest: triangle of circumradius 0.09 * 64
    assert total == sum(a.values()) > 60
    inst = json.loads((tmp_path / "a" / "synthetic" / "instances.json").read_text())
    kinds = {type(x["segmentation"]).__name__ for x in inst["annotations"]}
    assert kinds == {"list", "dict"}  # polygons and RLE


def test_unseen_pairs_never_in_other_splits_and_colours_match(tmp_path):
    root = tmp_path / "s"
    synthetic.generate(str(root), num_images=120, image_size=64, seed=0)
    refs = pickle.loads((root / "synthetic" / "refs(unc).p").read_bytes())
    inst = json.loads((root / "synthetic" / "instances.json").read_text())
    image_split = {r["image_id"]: r["split"] for r in refs}
    ds = {s: ReferDataset(root, "synthetic", "unc", s) for s in ("train", "unseen")}
    assert len(ds["unseen"]) > 0
    for r in refs:
        for s in r["sentences"]:
            words = s["raw"].split()
            pairs = set(zip(words, words[1:], strict=False))
            if r["split"] != "unseen":
                assert not pairs & synthetic.UNSEEN_PAIRS, s["raw"]
    for a in inst["annotations"]:  # objects of held-out pairs only appear in unseen images
        cat = synthetic.SHAPES[a["category_id"] - 1]
        if image_split.get(a["image_id"]) not in (None, "unseen"):
            colours = {c for c, sh in synthetic.UNSEEN_PAIRS if sh == cat}
            assert not any(f"{c} {cat}" in s["raw"] for r in refs for s in r["sentences"]
                           if r["ann_id"] == a["id"] for c in colours)
    # the pixels under a mask have the colour named by "the <colour> <shape>" expressions
    train = ds["train"]
    checked = 0
    for i, r in enumerate(train):
        words = r.sentence.split()
        if len(words) == 3 and words[1] in synthetic.COLOURS and words[2] in synthetic.SHAPES:
            m = train.load_mask(i).astype(bool)
            mean = train.load_image(i)[m].mean(axis=0)
            assert np.abs(mean - synthetic.COLOURS[words[1]]).max() < 30, (r, mean)
            checked += 1
    assert checked > 20


def test_expressions_identify_their_object():
    objs = [
        synthetic.Shape("red", "square", "big", 20, 50, 12),
        synthetic.Shape("green", "circle", "small", 80, 50, 8),
        synthetic.Shape("green", "circle", "big", 130, 50, 12),
        synthetic.Shape("blue", "triangle", "small", 80, 120, 8),
    ]
    got = synthetic.describe(objs, objs[1], 160)
    assert "the small circle" in got and "the small green circle" in got
    assert "the circle on the left" in got
    assert "the green circle" not in got  # two green circles
    assert "the circle left of the big green circle" not in got  # anchor is not unique
    # the other circle (130, 50) is not clearly above the triangle (80, 120): unique relation
    assert "the circle above the blue triangle" in got
    assert synthetic.describe(objs, objs[3], 160)[:2] == ["the triangle", "the blue shape"]
    assert "the circle right of the red square" not in got  # both circles are right of it


def test_cli_speed_few_thousand_expressions(tmp_path):
    t0 = time.perf_counter()
    synthetic.main(["--out", str(tmp_path / "cli"), "--num-images", "400", "--seed", "1"])
    assert time.perf_counter() - t0 < 30
    assert synthetic.is_complete(str(tmp_path / "cli"))
    n = sum(len(ReferDataset(tmp_path / "cli", "synthetic", "unc", s)) for s in SPLITS)
    assert n > 2000


def test_expression_type_of_every_template():
    cases = {
        "the circle": "attribute", "the red shape": "attribute", "the red circle": "attribute",
        "the small circle": "size", "the big red circle": "size",
        "the circle on the left": "extreme_shape", "the bottom square": "extreme_shape",
        "the top triangle": "extreme_shape",
        "the leftmost shape": "extreme_any", "the shape at the top": "extreme_any",
        "the circle left of the blue square": "relation",
        "the red circle below the blue square": "relation",
        "the diamond above the small square": "relation",
    }
    for sentence, kind in cases.items():
        assert synthetic.expression_type(sentence) == kind, sentence
    # Every family occurs among generated expressions, and nothing else does.
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(200):
        objs = synthetic._sample_objects(rng, 128, unseen=False)
        for o in objs:
            seen.update(synthetic.expression_type(s) for s in synthetic.describe(objs, o, 128))
    assert seen == set(synthetic.EXPRESSION_TYPES)
