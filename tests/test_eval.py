"""Evaluation: exact counts with a padded last batch, lavt metrics vs. NumPy, original protocol,
evaluate_splits outputs (results.json/.md, per-expression CSV) and the eval.py entry point."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from tests.conftest import SYN_COUNT, SYN_SPLIT
from vipa_jax import evaluate as ev
from vipa_jax import export
from vipa_jax.data import pipeline
from vipa_jax.data.refer import ReferDataset

BATCH = 5  # does not divide the 12 expressions: the last batch has 3 padding rows


def _dataset(root: Path) -> ReferDataset:
    """The 12-expression synthetic split."""
    return ReferDataset(str(root), "synthetic", "unc", SYN_SPLIT)


def _numpy_reference(model: Any, variables: Any, ds: ReferDataset, tok: Any) -> dict[str, Any]:
    """oIoU/mIoU/P@X computed independently in NumPy from the model's own logits."""
    batch = next(pipeline.make_eval_batches(ds, tok, global_batch_size=len(ds), image_size=64,
                                            shard_index=0, shard_count=1))
    fwd = jax.jit(lambda v, *x: model.apply(v, *x, train=False)["logits"])
    logits = np.asarray(fwd(variables, batch["image"], batch["input_ids"],
                            batch["attention_mask"]))
    pred, gt = logits > 0, batch["mask"].astype(bool)
    inter = (pred & gt).sum((1, 2)).astype(np.float64)
    union = (pred | gt).sum((1, 2)).astype(np.float64)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    out = {"oIoU": inter.sum() / union.sum(), "mIoU": iou.mean(), "iou": iou}
    for t in (0.5, 0.6, 0.7, 0.8, 0.9):
        out[f"P@{t:g}"] = float(np.mean(iou >= t))
    return out


def test_evaluate_lavt_matches_numpy_and_counts_exactly(
    bundle_dir: Path, synthetic_root: Path
) -> None:
    """Count == split size with a padded batch; lavt numbers equal the NumPy reference."""
    config, model, variables, tok = export.load_bundle(bundle_dir)
    ds = _dataset(synthetic_root)
    assert len(ds) == SYN_COUNT and SYN_COUNT % BATCH != 0
    res = ev.evaluate(model, variables, ds, tok, batch_size=BATCH, image_size=64,
                      protocol="both", per_sample=True, progress=False)
    assert set(res) == {"lavt", "original"}
    lavt, orig = res["lavt"], res["original"]
    assert lavt["count"] == orig["count"] == 12
    assert lavt["protocol"] == "lavt" and orig["protocol"] == "original"
    ref = _numpy_reference(model, variables, ds, tok)
    assert ref["oIoU"] > 0  # a random model still predicts some foreground overlap
    for k in ("oIoU", "mIoU", "P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9"):
        assert lavt[k] == pytest.approx(ref[k], abs=1e-6), k
    per = dict(lavt["per_sample"])
    assert sorted(per) == list(range(12))
    np.testing.assert_allclose([per[i] for i in range(12)], ref["iou"], atol=1e-6)
    # original protocol: scored at the images' 48x48 against the full-resolution masks
    assert sorted(i for i, _ in orig["per_sample"]) == list(range(12))
    assert 0.0 <= orig["oIoU"] <= 1.0 and orig["oIoU"] != lavt["oIoU"]


@pytest.mark.slow
def test_evaluate_splits_writes_results(
    bundle_dir: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    """results.json/.md and the per-expression CSV; the mesh path gives the same numbers."""
    from vipa_jax.train import sharding as shd

    config, model, variables, tok = export.load_bundle(bundle_dir)
    ds = _dataset(synthetic_root)
    mesh = shd.make_mesh((-1, 1))
    res = ev.evaluate_splits(model, variables, tok, config.data, [SYN_SPLIT], batch_size=BATCH,
                             image_size=64, protocol="lavt", out_dir=tmp_path, mesh=mesh,
                             per_sample_csv=True, checkpoint=str(bundle_dir), step=7,
                             datasets={SYN_SPLIT: ds}, progress=False)
    ref = _numpy_reference(model, variables, ds, tok)
    r = res[SYN_SPLIT]["lavt"]
    assert r["count"] == 12 and r["step"] == 7
    assert r["mIoU"] == pytest.approx(ref["mIoU"], abs=1e-6)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["step"] == 7 and doc["checkpoint"] == str(bundle_dir)
    assert doc["splits"][SYN_SPLIT]["lavt"]["oIoU"] == pytest.approx(ref["oIoU"], abs=1e-6)
    md = (tmp_path / "results.md").read_text()
    assert "protocol `lavt`" in md and f"{100 * ref['oIoU']:.2f}" in md
    rows = list(csv.DictReader(open(tmp_path / f"per_sample_{SYN_SPLIT}_lavt.csv")))
    assert len(rows) == 12 and rows[3]["sentence"] == ds[3].sentence
    assert int(rows[3]["ref_id"]) == ds[3].ref_id
    np.testing.assert_allclose([float(x["iou"]) for x in rows], ref["iou"], atol=1e-5)
    with pytest.raises(ValueError, match="protocol must be one of"):
        ev.protocols_for("coco")


def test_train_metrics_keys() -> None:
    """Flat training scalars: first protocol unprefixed, the second one prefixed."""
    res = {"val": {"lavt": {"oIoU": 0.5, "mIoU": 0.25, "P@0.5": 0.1, "count": 3,
                            "protocol": "lavt"},
                   "original": {"oIoU": 0.4, "mIoU": 0.2, "count": 3, "protocol": "original"}}}
    assert ev.train_metrics(res) == {"val_oIoU": 0.5, "val_mIoU": 0.25, "val_P@0.5": 0.1,
                                     "val_original_oIoU": 0.4, "val_original_mIoU": 0.2}


@pytest.mark.slow
def test_make_train_evaluator(tiny_model: dict[str, Any], synthetic_root: Path) -> None:
    """The training hook returns '<split>_oIoU'/'_mIoU' from a TrainState-like object."""
    from types import SimpleNamespace

    config = tiny_model["config"].copy_and_resolve_references()  # the fixture is shared
    config.data.root = str(synthetic_root)
    config.data.eval_splits = (SYN_SPLIT,)
    config.eval.batch_size = BATCH
    v = tiny_model["variables"]
    fn = ev.make_train_evaluator(config)
    state = SimpleNamespace(params=v["params"], batch_stats=v.get("batch_stats", {}))
    out = fn(state)
    ds = _dataset(synthetic_root)
    from vipa_jax.data.tokenizer import Tokenizer

    ref = _numpy_reference(tiny_model["model"], v, ds, Tokenizer(tiny_model["vocab"], 8))
    assert out[f"{SYN_SPLIT}_mIoU"] == pytest.approx(ref["mIoU"], abs=1e-6)
    assert out[f"{SYN_SPLIT}_oIoU"] == pytest.approx(ref["oIoU"], abs=1e-6)


def _run_eval_py(args: list[str], env: dict[str, str], cwd: Path) -> Any:
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, str(cwd / "eval.py"), *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_eval_py_two_processes_match_one(bundle_dir: Path, synthetic_root: Path,
                                         tmp_path: Path) -> None:
    """eval.py on 2 processes × 2 CPU devices (jax.distributed on localhost, each scoring its
    shard, a padded last batch) writes the same metrics, both protocols, as on 1 process."""
    from tests._procs import communicate_all, free_port, quick_env

    root = Path(__file__).resolve().parents[1]
    port = free_port()
    env = quick_env(2, JAX_PLATFORMS="cpu")
    common = [f"--checkpoint={bundle_dir}", "--config=configs/synthetic.py:test",
              f"--config.data.root={synthetic_root}", f"--splits={SYN_SPLIT}",
              "--protocol=both", "--batch_size=8"]  # 12 expressions: 8 + 4 real / 4 padding
    procs = [_run_eval_py([*common, f"--out={tmp_path / 'one'}"], env, root)]
    procs += [_run_eval_py([*common, f"--out={tmp_path / 'two'}", "--distributed",
                            f"--coordinator_address=localhost:{port}", "--num_processes=2",
                            f"--process_id={i}"], env, root) for i in range(2)]
    outs = communicate_all(procs, timeout=400)
    assert "oIoU" in outs[1][0] and "oIoU" not in outs[2][0]  # only process 0 prints
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())

    m1, m2 = ({(s, p): v for s, per in r["splits"].items() for p, v in per.items()}
              for r in (one, two))
    assert set(m1) == {(SYN_SPLIT, "lavt"), (SYN_SPLIT, "original")} == set(m2), m1.keys()
    for key, r1 in m1.items():
        assert r1["count"] == SYN_COUNT == m2[key]["count"], key
        for k in ("oIoU", "mIoU", "P@0.5", "P@0.9"):
            assert m2[key][k] == pytest.approx(r1[k], abs=1e-6), (key, k)
