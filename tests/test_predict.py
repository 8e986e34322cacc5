"""predict: RGB JPEG / grayscale PNG / RGBA PNG / EXIF-rotated JPEG end to end, heatmaps,
clear errors for empty text and unreadable images, and the predict.py / eval.py CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from tests.conftest import SYN_SPLIT
from vipa_jax import predict as pr

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def predictor(bundle_dir: Path) -> pr.Predictor:
    """The tiny random model from its bundle."""
    return pr.Predictor.from_checkpoint(bundle_dir)


def _images(d: Path) -> dict[str, tuple[Path, tuple[int, int]]]:
    """RGB JPEG 50x70, grayscale PNG 40x30, RGBA PNG 33x45 -> (path, (H, W))."""
    r = np.random.default_rng(0)
    rgb = d / "rgb.jpg"
    PIL.Image.fromarray(r.integers(0, 255, (50, 70, 3), np.uint8)).save(rgb, quality=90)
    gray = d / "gray.png"
    PIL.Image.fromarray(r.integers(0, 255, (40, 30), np.uint8), "L").save(gray)
    rgba = d / "rgba.png"
    PIL.Image.fromarray(r.integers(0, 255, (33, 45, 4), np.uint8), "RGBA").save(rgba)
    return {"rgb": (rgb, (50, 70)), "gray": (gray, (40, 30)), "rgba": (rgba, (33, 45))}


def test_predict_modes_sizes_and_heatmaps(predictor: pr.Predictor, tmp_path: Path) -> None:
    """Mask at the original size for each mode, overlay with caption strip, one heatmap/token."""
    for name, (path, (h, w)) in _images(tmp_path).items():
        out = tmp_path / "out" / f"{name}.png"
        paths = pr.predict_file(predictor, path, "the red circle", out, heatmaps=True)
        mask = np.asarray(PIL.Image.open(out))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}, name
        overlay = PIL.Image.open(tmp_path / "out" / f"{name}_overlay.png")
        assert overlay.size[0] == w and overlay.size[1] > h  # caption strip below
        heats = sorted(p.name for p in paths if "_heat_" in p.name)
        assert heats == [f"{name}_heat_00_cls.png", f"{name}_heat_01_the.png",
                         f"{name}_heat_02_red.png", f"{name}_heat_03_circle.png"]
        assert np.asarray(PIL.Image.open(tmp_path / "out" / heats[2])).shape[:2][1] == w
    # the written mask is exactly the thresholded, upsampled logits of the predictor
    image = pr.load_image(_images(tmp_path)["rgb"][0])
    p = predictor(image, "the red circle")
    assert p.relevance.shape == (4, 2, 2) and p.tokens == ["[CLS]", "the", "red", "circle"]
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "out" / "rgb.png")) > 0, p.mask)
    assert np.array_equal(p.mask, p.logits > 0)


def test_exif_rotation(tmp_path: Path) -> None:
    """An EXIF orientation-6 JPEG (stored 20x40) loads upright as 40x20."""
    im = PIL.Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert pr.load_image(tmp_path / "rot.jpg").shape == (40, 20, 3)


def test_errors_name_the_input(predictor: pr.Predictor, tmp_path: Path) -> None:
    """Empty expressions and unreadable/missing images raise PredictError naming them."""
    img = _images(tmp_path)["rgb"][0]
    with pytest.raises(pr.PredictError, match="empty referring expression"):
        pr.predict_file(predictor, img, "   ")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(pr.PredictError, match=r"bad\.jpg.*cannot decode"):
        pr.predict_file(predictor, bad, "the red circle")
    with pytest.raises(pr.PredictError, match=r"not found: .*missing\.png"):
        pr.load_image(tmp_path / "missing.png")


@pytest.mark.slow
def test_cli_predict_jsonl_and_eval(
    bundle_dir: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    """predict.py batch mode (one bad line -> exit 1, others written) and eval.py on a bundle."""
    imgs = _images(tmp_path)
    lines = [{"image": str(imgs["gray"][0]), "text": "the big square",
              "out": str(tmp_path / "g.png")},
             {"image": str(tmp_path / "nope.jpg"), "text": "the red circle"}]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "predict.py", f"--checkpoint={bundle_dir}",
                        f"--jsonl={jsonl}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "pairs.jsonl:2" in r.stderr and "nope.jpg" in r.stderr
    assert np.asarray(PIL.Image.open(tmp_path / "g.png")).shape == (40, 30)
    cfg = json.loads((bundle_dir / "config.json").read_text())
    cfg["data"]["root"] = str(synthetic_root)
    b2 = tmp_path / "bundle"
    b2.mkdir()
    for f in ("params.safetensors", "vocab.txt", "tokenizer_config.json"):
        (b2 / f).write_bytes((bundle_dir / f).read_bytes())
    (b2 / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "eval.py", f"--checkpoint={b2}", f"--splits={SYN_SPLIT}",
                        "--protocol=both", f"--out={tmp_path / 'ev'}", "--batch_size=5"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert doc["splits"][SYN_SPLIT]["lavt"]["count"] == 12
    assert doc["splits"][SYN_SPLIT]["original"]["protocol"] == "original"
    assert "protocol `original`" in r.stdout
