"""Shape probe: how fast does a backbone learn *which shape* is under each pixel (synthetic data)?

    python -m benchmarks.shape_probe [--steps 400] [--backbones swin,cnn] [--quick] [--out DIR]

Trains, from scratch, each backbone plus a small per-pixel head to classify every pixel of the
built-in synthetic images as background / circle / square / triangle / diamond (AdamW 1e-3,
batch 16), and reports the foreground-pixel accuracy on held-out images as training goes.

- ``swin``: the Swin of ``configs/synthetic.py`` (the demo's tiny Swin). Each stage goes
  through a linear layer, is resized to the 1/4 grid and summed, then a ReLU and a linear
  classifier.
- ``cnn``: 8 plain 3×3 conv + ReLU layers (two of them stride 2) and a linear classifier at
  1/4 resolution.

The demo's errors are mostly same-colour, other-shape distractors. This probe measures the
cause on its own: the from-scratch Swin learns shapes far more slowly than a CNN (README,
"Demo results"); hence the demo's Swin is pretrained on this task
(``vipa_jax/weights/synthetic_swin.py``).
It writes ``benchmarks/results/shape_probe-<machine>.json``.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from benchmarks import common
from vipa_jax.data import synthetic
from vipa_jax.weights.synthetic_swin import (
    NUM_CLASSES,
    SwinShapeClassifier,
    load_shape_data,
    train_shape_classifier,
)


class CnnProbe(nn.Module):
    """8 × (3×3 conv + ReLU), strides 2, 1, 2, 1, 1, 1, 1, 1 → linear classifier at 1/4."""

    widths: tuple[int, ...] = (32, 64, 128, 128)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, c in enumerate(self.widths):
            x = nn.relu(nn.Conv(c, (3, 3), strides=2 if i < 2 else 1)(x))
            x = nn.relu(nn.Conv(c, (3, 3))(x))
        return nn.Dense(NUM_CLASSES)(x)


def build(name: str, quick: bool) -> nn.Module:
    """The probe model for backbone ``name`` (swin | cnn)."""
    if name == "swin":
        from configs.synthetic import get_config

        swin = get_config("test" if quick else None).model.swin.to_dict()
        return SwinShapeClassifier(swin, width=16 if quick else 64)
    if name == "cnn":
        return CnnProbe((8, 8, 16, 16) if quick else (32, 64, 128, 128))
    raise ValueError(f"unknown probe backbone {name!r}; choose swin or cnn")


def run_probe(name: str, images: np.ndarray, labels: np.ndarray, *, steps: int, evals: int,
              batch: int, num_val: int, quick: bool) -> dict[str, Any]:
    """Train one probe; returns {'backbone', 'curve': [{step, loss, val_fg_acc}], 's_per_step'}."""
    print(f"{name}:", flush=True)
    _, curve, s_per_step = train_shape_classifier(
        build(name, quick), images, labels, steps=steps, batch=batch, num_val=num_val,
        evals=evals)
    return {"backbone": name, "curve": curve, "s_per_step": s_per_step}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default="swin,cnn")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--evals", type=int, default=4, help="evaluations over the run")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="tiny models and data, a few steps")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.evals, a.num_images, a.image_size = 4, 2, 24, 64
    num_val = max(4, a.num_images // 16)
    batch = 4 if a.quick else 16
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.generate(tmp, a.num_images, a.image_size, seed=1)
        images, labels = load_shape_data(tmp)
    results = [run_probe(b.strip(), images, labels, steps=a.steps, evals=a.evals,
                         batch=batch, num_val=num_val, quick=a.quick)
               for b in a.backbones.split(",") if b.strip()]
    rows = [[r["backbone"], c["step"], f"{c['val_fg_acc']:.3f}", f"{r['s_per_step']:.3f}"]
            for r in results for c in r["curve"]]
    title = f"shape probe ({a.num_images} images at {a.image_size}px, batch {batch})"
    common.print_table(rows, ["backbone", "step", "val fg acc", "s/step"], title=title)
    path = common.write_result("shape_probe", {
        "quick": a.quick, "steps": a.steps, "num_images": a.num_images,
        "image_size": a.image_size, "results": results}, a.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
