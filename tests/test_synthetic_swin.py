"""The demo's synthetic-shape Swin pretraining and the weights configs/synthetic.py ships with."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from configs.synthetic import get_config
from tests._procs import quick_env
from vipa_jax.models.swin import SwinTransformer, sine_position_table
from vipa_jax.weights.swin import load_swin_params, save_swin_params
from vipa_jax.weights.synthetic_swin import load_shape_data, pretrain_swin

ROOT = Path(__file__).resolve().parents[1]


def test_pretrain_swin_quick(tmp_path):
    """A few steps on tiny data: Swin params of the config's architecture, a finite curve, and
    labels that mark exactly the drawn shapes (background 0, shape ids 1-4)."""
    swin = get_config("test").model.swin.to_dict()
    params, curve = pretrain_swin(swin, steps=3, num_images=12, image_size=64, evals=1,
                                  data_dir=str(tmp_path / "data"), log=False)
    images, labels = load_shape_data(tmp_path / "data")
    assert images.shape == (12, 64, 64, 3) and labels.shape == (12, 64, 64)
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4} and (labels > 0).mean() > 0.05
    assert len(curve) == 1 and 0.0 <= curve[0]["val_fg_acc"] <= 1.0
    model = SwinTransformer.from_config(swin)
    expected = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
    assert jax.tree.structure(expected) == jax.tree.structure(params)
    path = save_swin_params(params, tmp_path / "swin.safetensors")
    loaded, _ = load_swin_params(path, model)
    out = model.apply({"params": loaded}, jnp.ones((1, 64, 64, 3)))
    assert all(bool(jnp.isfinite(f).all()) for f in out)


def test_synthetic_config_ships_matching_pretrained_swin():
    """configs/synthetic.py's init_swin exists in the repo and fits its Swin exactly, but for
    the sine ape table that fine-tuning adds (the pretrained weights have none)."""
    config = get_config()
    path = ROOT / config.train.init_swin
    assert path.is_file(), path
    swin = config.model.swin.to_dict()
    assert swin["ape"] and swin["ape_init"] == "sine"
    model = SwinTransformer.from_config(swin)
    loaded, report = load_swin_params(path, model)
    assert report.source_format == "vipa_jax"
    assert report.missing == ["absolute_pos_embed/table"]
    table = np.asarray(loaded["absolute_pos_embed"]["table"])
    np.testing.assert_array_equal(table, sine_position_table(*table.shape[1:]))
    _, report = load_swin_params(path, SwinTransformer.from_config({**swin, "ape": False}))
    assert not report.missing
    assert get_config("test").train.init_swin == ""


def test_pretrain_cli_with_config_overrides(tmp_path):
    """The command line reads a config (with --config.x=y overrides) and writes loadable weights
    of exactly that architecture."""
    import subprocess
    import sys

    out = tmp_path / "swin.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "vipa_jax.weights.synthetic_swin", f"--out={out}",
         "--config=configs/synthetic.py:test", "--config.model.swin.embed_dim=8",
         "--steps=2", "--num_images=8"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=quick_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "wrote" in proc.stdout
    # Without --ape the weights have no ape table (fine-tuning adds the config's sine table).
    swin = {**get_config("test").model.swin.to_dict(), "embed_dim": 8, "ape": False}
    _, report = load_swin_params(out, SwinTransformer.from_config(swin))
    assert report.source_format == "vipa_jax" and not report.missing
