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
"Demo results"). It writes ``benchmarks/results/shape_probe-<machine>.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import PIL.Image

from benchmarks import common
from vipa_jax.data import synthetic
from vipa_jax.data.pipeline import IMAGENET_MEAN, IMAGENET_STD
from vipa_jax.data.refer import COCO_IMAGE_DIR, decode_segmentation
from vipa_jax.models.layers import resize_bilinear_align_corners
from vipa_jax.models.swin import SwinTransformer

NUM_CLASSES = 1 + len(synthetic.SHAPES)  # background + shapes


def load_probe_data(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """ImageNet-normalized images (N, S, S, 3) and per-pixel shape labels (N, S, S) int32."""
    inst = json.loads((root / synthetic.DATASET_NAME / "instances.json").read_text())
    labels = {im["id"]: np.zeros((im["height"], im["width"]), np.int32) for im in inst["images"]}
    for a in inst["annotations"]:
        lab = labels[a["image_id"]]
        lab[decode_segmentation(a["segmentation"], *lab.shape) > 0] = a["category_id"]
    images = []
    for im in inst["images"]:
        rgb = np.asarray(PIL.Image.open(root / COCO_IMAGE_DIR / im["file_name"]).convert("RGB"))
        images.append((rgb.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD)
    return np.stack(images), np.stack([labels[im["id"]] for im in inst["images"]])


class SwinProbe(nn.Module):
    """Swin stages → linear → resized to the 1/4 grid and summed → ReLU → linear classifier."""

    swin: dict[str, Any]
    width: int = 64

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        feats = SwinTransformer.from_config(self.swin)(x)
        grid = feats[0].shape[1:3]
        h = sum(resize_bilinear_align_corners(nn.Dense(self.width)(f), grid, axes=(1, 2))
                for f in feats)
        return nn.Dense(NUM_CLASSES)(nn.relu(h))  # (B, H/4, W/4, classes)


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
        return SwinProbe(swin, width=16 if quick else 64)
    if name == "cnn":
        return CnnProbe((8, 8, 16, 16) if quick else (32, 64, 128, 128))
    raise ValueError(f"unknown probe backbone {name!r}; choose swin or cnn")


def foreground_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Share of foreground pixels whose argmax class is right (logits resized to the labels)."""
    full = resize_bilinear_align_corners(logits, labels.shape[1:3], axes=(1, 2))
    fg = labels > 0
    return ((full.argmax(-1) == labels) & fg).sum() / jnp.maximum(fg.sum(), 1)


def run_probe(name: str, images: np.ndarray, labels: np.ndarray, *, steps: int, evals: int,
              batch: int, num_val: int, quick: bool, seed: int = 0) -> dict[str, Any]:
    """Train one probe; returns {'backbone', 'curve': [{step, val_fg_acc}], 's_per_step'}."""
    model = build(name, quick)
    train_x, train_y = images[:-num_val], labels[:-num_val]
    val_x, val_y = jnp.asarray(images[-num_val:]), jnp.asarray(labels[-num_val:])
    params = model.init(jax.random.PRNGKey(seed), val_x[:1])
    tx = optax.adamw(1e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        def loss_fn(p):
            logits = resize_bilinear_align_corners(model.apply(p, x), y.shape[1:3], axes=(1, 2))
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    evaluate = jax.jit(lambda p, x, y: foreground_accuracy(model.apply(p, x), y))
    rng = np.random.default_rng(seed)
    marks = set(np.linspace(0, steps, evals + 1).round().astype(int).tolist()[1:])
    curve, t_train = [], 0.0
    for i in range(1, steps + 1):
        idx = rng.integers(0, len(train_x), batch)
        t0 = time.perf_counter()
        params, opt, loss = step(params, opt, train_x[idx], train_y[idx])
        jax.block_until_ready(loss)
        t_train += time.perf_counter() - t0 if i > 1 else 0.0  # the first step compiles
        if i in marks:
            acc = float(evaluate(params, val_x, val_y))
            curve.append({"step": i, "loss": float(loss), "val_fg_acc": acc})
            print(f"  {name} step {i}: loss {float(loss):.3f}, val foreground accuracy "
                  f"{curve[-1]['val_fg_acc']:.3f}", flush=True)
    return {"backbone": name, "curve": curve, "s_per_step": t_train / max(steps - 1, 1)}


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
        images, labels = load_probe_data(Path(tmp))
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
