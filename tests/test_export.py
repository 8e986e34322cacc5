"""Inference bundles: export from an orbax training checkpoint, load_bundle round trip, errors.

The tiny model, its bundle and the synthetic dataset are session fixtures in conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.conftest import WORDS
from vipa_jax import export


def _logits(model: Any, variables: Any, seed: int = 0) -> np.ndarray:
    """Logits of a fixed random batch of 2."""
    r = np.random.default_rng(seed)
    img = r.normal(size=(2, 64, 64, 3)).astype(np.float32)
    ids = np.array([[2, 5, 6, 7, 3, 0, 0, 0], [2, 8, 3, 0, 0, 0, 0, 0]], np.int32)
    # jitted (one compile per model; identical programs give identical bits)
    fwd = jax.jit(lambda v: model.apply(v, img, ids, (ids > 0).astype(np.int32))["logits"])
    return np.asarray(fwd(variables))


def test_bundle_round_trip_bit_identical(tiny_model: dict[str, Any], bundle_dir: Path) -> None:
    """save_bundle -> load_bundle: same config, same tensors, bit-identical logits."""
    assert sorted(p.name for p in bundle_dir.iterdir()) == [
        "config.json", "params.safetensors", "tokenizer_config.json", "vocab.txt"]
    config, model, variables, tok = export.load_bundle(bundle_dir)
    assert config.model.to_dict() == tiny_model["config"].model.to_dict()  # tuples restored
    a = export.flatten_variables(tiny_model["variables"])
    b = export.flatten_variables(variables)
    assert sorted(a) == sorted(b) and any(k.startswith("batch_stats/") for k in a) == (
        "batch_stats" in tiny_model["variables"])
    assert all(np.array_equal(a[k], b[k]) for k in a)
    ref = _logits(tiny_model["model"], tiny_model["variables"])
    got = _logits(model, variables)
    assert ref.shape == (2, 64, 64) and np.array_equal(ref, got)
    assert tok.max_length == 8 and tok.lowercase is True
    ids = [5 + WORDS.index(w) for w in ("the", "red", "circle")]  # 5 specials come first
    assert tok("the red circle")["input_ids"].tolist() == [[2, *ids, 3, 0, 0, 0]]
    loaded = export.load_any(bundle_dir)
    assert loaded.source == "bundle" and loaded.step == 7


@pytest.mark.slow
def test_export_from_orbax_checkpoint(tiny_model: dict[str, Any], tmp_path: Path) -> None:
    """A Checkpointer-saved TrainState (with Adam state) exports without the optimizer."""
    from vipa_jax.train.checkpoint import Checkpointer
    from vipa_jax.train.step import TrainState

    v = jax.tree.map(lambda x: x + 0.5, tiny_model["variables"])  # not the init values
    params = v["params"]
    tx = optax.adamw(1e-3)
    state = TrainState(step=jnp.array(11, jnp.int32), params=params,
                       batch_stats=v.get("batch_stats", {}), opt_state=tx.init(params))
    ck = Checkpointer(tmp_path / "wd" / "checkpoints", async_save=False)
    ck.save(11, state, meta={"config": tiny_model["config"].to_dict(), "step": 11})
    ck.close()
    out = export.export(tmp_path / "wd", tmp_path / "bundle")
    config, model, variables, _ = export.load_bundle(out)
    assert config.data.vocab == str(tiny_model["vocab"])
    assert np.array_equal(_logits(model, variables), _logits(tiny_model["model"], v))
    loaded = export.load_any(tmp_path / "wd")
    assert loaded.source == "checkpoint" and loaded.step == 11
    assert loaded.path.endswith("checkpoints/11")
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 3"):
        export.find_step_dir(tmp_path / "wd", 3)
    assert export.main(["--checkpoint", str(tmp_path / "wd" / "checkpoints" / "11"),
                        "--out", str(tmp_path / "b2")]) == 0
    assert export.is_bundle(tmp_path / "b2")


def test_bundle_errors(bundle_dir: Path, tmp_path: Path) -> None:
    """Missing files are named; a config/param shape mismatch names the tensor."""
    import shutil

    broken = tmp_path / "b"
    shutil.copytree(bundle_dir, broken)
    (broken / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['vocab.txt'\]"):
        export.load_bundle(broken)
    shutil.copy(bundle_dir / "vocab.txt", broken / "vocab.txt")
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model"]["veg"]["dim"] = 48
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"shape mismatch.*params/veg/.*file \(.*32.*\) vs config"):
        export.load_bundle(broken)
    with pytest.raises(FileNotFoundError, match="neither an inference bundle"):
        export.load_any(tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint path not found"):
        export.load_any(tmp_path / "nope")
