"""Inference bundles: export from an orbax training checkpoint, load_bundle round trip, errors.

Also defines the fixtures shared by test_eval.py / test_predict.py: a random-init tiny model
(``configs/synthetic.py:test``) saved as a bundle, its tiny vocabulary and a 2-image synthetic
dataset (12 expressions at 48x48, i.e. not the network's 64x64).
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

from configs import synthetic as synthetic_config
from vipa_jax import export
from vipa_jax.models.vipa import build_model, init_variables

WORDS = (
    "the a of on at left right top bottom above below big small shape leftmost rightmost "
    "topmost bottommost red green blue yellow purple circle square triangle diamond man "
    "woman photo"
).split()
SYN_IMAGES, SYN_SIZE, SYN_SPLIT, SYN_COUNT = 2, 48, "train", 12


def write_vocab(path: Path) -> Path:
    """A tiny WordPiece vocab: specials, the synthetic words, letters and ##letters."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    toks = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *letters,
            *[f"##{c}" for c in letters]]
    path.write_text("\n".join(toks) + "\n")
    return path


def tiny_config(vocab: Path | None = None) -> Any:
    """The test-size synthetic config (64x64, 8 tokens) with ``data.vocab`` set."""
    c = synthetic_config.get_config("test")
    if vocab is not None:
        c.data.vocab = str(vocab)
    return c


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """config, model, random variables (seed 0) and the vocab path."""
    d = tmp_path_factory.mktemp("tiny_model")
    vocab = write_vocab(d / "vocab.txt")
    config = tiny_config(vocab)
    model = build_model(config.model)
    variables = init_variables(model, jax.random.PRNGKey(0), config.model.image_size,
                               config.model.max_tokens)
    return {"config": config, "model": model, "variables": variables, "vocab": vocab}


@pytest.fixture(scope="session")
def bundle_dir(tiny_model: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved as an inference bundle."""
    out = tmp_path_factory.mktemp("bundle")
    export.save_bundle(out, tiny_model["config"], tiny_model["variables"], tiny_model["vocab"],
                       step=7)
    return out


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-image synthetic refer-layout dataset (12 'train' expressions)."""
    from vipa_jax.data import synthetic

    root = tmp_path_factory.mktemp("syn")
    counts = synthetic.generate(str(root), num_images=SYN_IMAGES, image_size=SYN_SIZE, seed=0,
                                sentences_per_object=2)
    assert counts == {SYN_SPLIT: SYN_COUNT}
    return root


def _logits(model: Any, variables: Any, seed: int = 0) -> np.ndarray:
    """Logits of a fixed random batch of 2."""
    r = np.random.default_rng(seed)
    img = r.normal(size=(2, 64, 64, 3)).astype(np.float32)
    ids = np.array([[2, 5, 6, 7, 3, 0, 0, 0], [2, 8, 3, 0, 0, 0, 0, 0]], np.int32)
    return np.asarray(model.apply(variables, img, ids, (ids > 0).astype(np.int32))["logits"])


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
