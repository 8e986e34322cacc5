"""grain pipeline: batches, epochs, determinism, checkpointed state, host sharding, eval padding."""

from __future__ import annotations

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import SPLIT_COUNTS, TRAIN_OBJECTS, expected_mask
from vipa_jax.data import pipeline
from vipa_jax.data.refer import DataError, ReferDataset

SIZE = 16


def _train(ds, tok, *, batch=4, seed=0, shard=(0, 1), **kw):
    """Train iterator on the fixture at SIZE x SIZE."""
    return pipeline.make_train_iterator(
        ds, tok, global_batch_size=batch, image_size=SIZE, seed=seed,
        shard_index=shard[0], shard_count=shard[1], **kw,
    )


def _take(it, n):
    """The next ``n`` batches."""
    return [next(it) for _ in range(n)]


def test_batch_layout_and_values(refer_root, wordpiece):
    ds = ReferDataset(refer_root, "refcoco", "unc", "train")
    b = next(_train(ds, wordpiece))
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        "image": ((4, SIZE, SIZE, 3), np.float32), "mask": ((4, SIZE, SIZE), np.uint8),
        "input_ids": ((4, 12), np.int32), "attention_mask": ((4, 12), np.int32),
        "valid": ((4,), np.bool_), "index": ((4,), np.int32),
    }
    assert b["valid"].all()
    for k, i in enumerate(b["index"]):
        np.testing.assert_array_equal(
            b["mask"][k], pipeline.resize_mask(expected_mask(ds[i].ann_id), SIZE)
        )
        ids = wordpiece([ds[i].sentence])["input_ids"][0]
        np.testing.assert_array_equal(b["input_ids"][k], ids)
        assert ids[0] == 101 and b["attention_mask"][k].sum() == 8  # [CLS] 6 words [SEP]
    # ImageNet normalisation of a constant colour, and nearest resize keeps {0, 1}
    red = np.zeros((5, 7, 3), np.uint8)
    red[..., 0] = 255
    x = pipeline.preprocess_image(red, (4, 6))
    assert x.shape == (4, 6, 3)
    np.testing.assert_allclose(x[0, 0], [(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225],
                               rtol=1e-6)
    m = pipeline.resize_mask(expected_mask(1), 48)
    # 8x5 source box at x 2..9, y 3..7 -> output columns 3..14 and rows 6..15 (pixel centres)
    assert set(np.unique(m)) == {0, 1} and m.sum() == 12 * 10 and m[6:16, 3:15].all()


def test_one_sentence_per_object_per_epoch(refer_root):
    ds = ReferDataset(refer_root, "refcoco", "unc", "train")
    order = pipeline.TrainOrder(ds.objects, seed=3, num_epochs=None)
    record_object = {i: k for k, obj in enumerate(ds.objects) for i in obj}
    drawn = {k: set() for k in range(TRAIN_OBJECTS)}
    for epoch in range(12):
        idx = [order[epoch * TRAIN_OBJECTS + p] for p in range(TRAIN_OBJECTS)]
        assert sorted(record_object[i] for i in idx) == list(range(TRAIN_OBJECTS))
        for i in idx:
            drawn[record_object[i]].add(i)
    # over 12 epochs every sentence of the 3-sentence objects shows up (P(miss) < 1e-2)
    for k, obj in enumerate(ds.objects):
        assert drawn[k] <= set(obj)
        if len(obj) == 3:
            assert drawn[k] == set(obj)
    # the draw depends only on (seed, epoch, object)
    again = pipeline.TrainOrder(ds.objects, seed=3, num_epochs=None)
    assert [again[i] for i in range(40)] == [order[i] for i in range(40)]
    other = pipeline.TrainOrder(ds.objects, seed=4, num_epochs=None)
    assert [other[i] for i in range(40)] != [order[i] for i in range(40)]


def test_same_seed_same_batches_and_epoch_through_iterator(refer_root, wordpiece):
    ds = ReferDataset(refer_root, "refcoco", "unc", "train")
    a, b = _take(_train(ds, wordpiece, seed=7), 4), _take(_train(ds, wordpiece, seed=7), 4)
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    c = _take(_train(ds, wordpiece, seed=8), 4)
    assert any((x["index"] != y["index"]).any() for x, y in zip(a, c, strict=True))
    first_epoch = np.concatenate([x["index"] for x in a[:2]])  # 2 batches of 4 = 8 objects
    objs = sorted(next(k for k, o in enumerate(ds.objects) if i in o) for i in first_epoch)
    assert objs == list(range(TRAIN_OBJECTS))


def test_restore_from_state_continues_the_stream(refer_root, wordpiece, tmp_path):
    ds = ReferDataset(refer_root, "refcoco", "unc", "train")
    it = _train(ds, wordpiece, seed=1)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 3)
    resumed = _train(ds, wordpiece, seed=1)
    resumed.set_state(state)
    got = _take(resumed, 3)
    for x, y in zip(expected, got, strict=True):
        np.testing.assert_array_equal(x["index"], y["index"])
        np.testing.assert_array_equal(x["image"], y["image"])
    # through orbax with grain's checkpoint handler
    it2 = _train(ds, wordpiece, seed=1)
    _take(it2, 3)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter",))
    mngr.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it2)))
    mngr.wait_until_finished()
    fresh = _train(ds, wordpiece, seed=1)
    mngr.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    np.testing.assert_array_equal(next(fresh)["index"], expected[0]["index"])


def test_two_hosts_get_disjoint_halves_of_the_global_batch(refer_root, wordpiece):
    ds = ReferDataset(refer_root, "refcoco", "unc", "train")
    single = _take(_train(ds, wordpiece, batch=4, seed=5), 6)
    h0 = _take(_train(ds, wordpiece, batch=4, seed=5, shard=(0, 2)), 6)
    h1 = _take(_train(ds, wordpiece, batch=4, seed=5, shard=(1, 2)), 6)
    order = pipeline.TrainOrder(ds.objects, seed=5, num_epochs=None)
    for s in range(6):
        assert h0[s]["index"].shape == (2,)
        positions = range(4 * s, 4 * s + 4)
        assert h0[s]["index"].tolist() == [order[p] for p in positions[0::2]]
        assert h1[s]["index"].tolist() == [order[p] for p in positions[1::2]]
        assert sorted(h0[s]["index"].tolist() + h1[s]["index"].tolist()) == sorted(
            single[s]["index"].tolist()
        )
    # disjoint within each epoch (8 objects = 2 global batches): no object on both hosts
    for e in range(3):
        a = {i for b in h0[2 * e: 2 * e + 2] for i in b["index"].tolist()}
        b = {i for b in h1[2 * e: 2 * e + 2] for i in b["index"].tolist()}
        assert not a & b and len(a) == len(b) == 4
    with pytest.raises(ValueError, match="multiple of the 3 host"):
        _train(ds, wordpiece, batch=4, shard=(0, 3))


def test_eval_every_sentence_once_with_padding(refer_root, wordpiece):
    ds = ReferDataset(refer_root, "refcoco", "unc", "train")
    assert len(ds) == SPLIT_COUNTS["train"] == 15
    kw = dict(global_batch_size=4, image_size=SIZE)
    batches = list(pipeline.make_eval_batches(ds, wordpiece, shard_index=0, shard_count=1, **kw))
    assert len(batches) == pipeline.num_eval_batches(15, 4) == 4
    idx = np.concatenate([b["index"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert idx.tolist() == list(range(15)) + [-1]
    assert valid.tolist() == [True] * 15 + [False]
    assert batches[-1]["mask"][-1].sum() == 0 and batches[-1]["image"][-1].sum() == 0
    hosts = [
        list(pipeline.make_eval_batches(ds, wordpiece, shard_index=h, shard_count=2, **kw))
        for h in (0, 1)
    ]
    assert [len(h) for h in hosts] == [4, 4]
    got = sorted(i for h in hosts for b in h for i in b["index"].tolist() if i >= 0)
    assert got == list(range(15))


def test_bad_image_raises_or_is_marked_invalid(refer_root, wordpiece, caplog):
    (refer_root / "images" / "mscoco" / "images" / "train2014" / "img1.jpg").write_bytes(b"x")
    ds = ReferDataset(refer_root, "refcoco", "unc", "train")
    kw = dict(global_batch_size=16, image_size=SIZE, shard_index=0, shard_count=1)
    with pytest.raises(DataError, match=r"img1\.jpg \(record \d+ .*cannot decode image"):
        list(pipeline.make_eval_batches(ds, wordpiece, **kw))
    with caplog.at_level("WARNING"):
        (b,) = list(pipeline.make_eval_batches(ds, wordpiece, on_error="skip", **kw))
    bad = np.array([ds[i].image_id == 1 for i in range(15)] + [False])
    assert bad.sum() == 12  # refs 1, 2, 6, 7, 9, 10 (2+3+1+3+1+2 sentences) on img1
    np.testing.assert_array_equal(b["valid"], ~bad & (b["index"] >= 0))
    assert "skipping bad record" in caplog.text


def test_load_dataset_dispatch(refer_root, tmp_path):
    cfg = ml_collections.ConfigDict(dict(
        source="refer", root=str(refer_root), dataset="refcoco", split_by="unc",
        on_error="raise",
    ))
    assert len(pipeline.load_dataset(cfg, "val")) == SPLIT_COUNTS["val"]
    cfg.source = "nope"
    with pytest.raises(ValueError, match="unknown config.data.source 'nope'"):
        pipeline.load_dataset(cfg, "val")
    cfg.source, cfg.root = "synthetic", str(tmp_path / "syn")
    cfg.synthetic_num_images, cfg.synthetic_image_size = 30, 64
    val = pipeline.load_dataset(cfg, "train")
    assert (tmp_path / "syn" / "synthetic" / "refs(unc).p").is_file() and len(val) > 30
    assert len(pipeline.load_dataset(cfg, "train")) == len(val)  # second call reuses it


@pytest.mark.slow
def test_worker_processes_give_the_same_stream(refer_root, wordpiece):
    ds = ReferDataset(refer_root, "refcoco", "unc", "train")
    ref = _take(_train(ds, wordpiece, seed=2), 3)
    got = _take(_train(ds, wordpiece, seed=2, num_workers=2), 3)
    for x, y in zip(ref, got, strict=True):
        np.testing.assert_array_equal(x["index"], y["index"])
        np.testing.assert_array_equal(x["image"], y["image"])


def test_read_threads_give_the_same_stream(refer_root, wordpiece):
    """`num_threads` (`data.num_threads`) changes how many examples are prepared at once, not
    which or in what order."""
    ds = ReferDataset(refer_root, "refcoco", "unc", "train")
    ref = _take(_train(ds, wordpiece, seed=2, num_threads=1), 3)
    got = _take(_train(ds, wordpiece, seed=2, num_threads=4), 3)
    for x, y in zip(ref, got, strict=True):
        np.testing.assert_array_equal(x["index"], y["index"])
        np.testing.assert_array_equal(x["image"], y["image"])


def test_train_data_takes_workers_and_threads_from_the_config(monkeypatch, refer_root):
    """`data.num_workers` and `data.num_threads` reach the training iterator."""
    from vipa_jax import defaults
    from vipa_jax.data import tokenizer
    from vipa_jax.train import loop

    seen = {}
    monkeypatch.setattr(pipeline, "make_train_iterator", lambda *a, **kw: seen.update(kw))
    monkeypatch.setattr(tokenizer, "vocab_for", lambda cfg: str(refer_root / "vocab.txt"))
    monkeypatch.setattr(tokenizer, "Tokenizer", lambda *a, **kw: None)
    cfg = defaults.get_base_config()
    cfg.data.root, cfg.data.dataset = str(refer_root), "refcoco"
    cfg.data.num_workers, cfg.data.num_threads = 3, 5
    cfg.train.batch_size = 2
    loop.build_train_data(cfg, 0, 1, 2)
    assert seen["num_workers"] == 3 and seen["num_threads"] == 5
    # a config from before these fields (an older checkpoint's) gets the iterators' defaults
    old = ml_collections.ConfigDict({"root": "x"})
    assert pipeline.loader_options(old) == {"num_workers": 0, "num_threads": 2}
    cfg.data.num_threads = -1
    with pytest.raises(ValueError, match=r"config\.data\.num_threads must be >= 0, got -1"):
        loop.build_train_data(cfg, 0, 1, 2)
