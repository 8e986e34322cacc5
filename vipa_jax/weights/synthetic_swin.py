"""Pretrain a Swin on synthetic shapes: the demo's stand-in for ImageNet pretraining.

    python -m vipa_jax.weights.synthetic_swin --out assets/synthetic_tiny_swin.safetensors \
        [--config configs/synthetic.py] [--config.model.swin.x=y] [--steps 2000] \
        [--num_images 3000] [--seed 7] [--data_dir DIR]

VIPA fine-tunes an ImageNet-pretrained Swin. No Swin weights can be downloaded here, and a
from-scratch Swin learns to tell shapes apart slowly (``benchmarks/shape_probe.py``: 53% of
foreground pixels right after 400 steps, against 95% for a small CNN). So the demo's tiny Swin
starts from weights made by this script instead. It generates a synthetic image set with its
own seed (7; the demo's data uses seed 0, so no demo val/unseen image is seen). It then trains
the Swin, plus a per-pixel head, to classify each pixel as background / circle / square /
triangle / diamond; this is the probe task. Last it writes the Swin's params, keyed by their
flax paths, as safetensors that ``train.init_swin`` loads. No referring expressions or masks
of referred objects are used.
"""

from __future__ import annotations

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

from vipa_jax.data import synthetic
from vipa_jax.data.pipeline import IMAGENET_MEAN, IMAGENET_STD
from vipa_jax.data.refer import COCO_IMAGE_DIR, decode_segmentation
from vipa_jax.models.layers import resize_bilinear_align_corners
from vipa_jax.models.swin import SwinTransformer

NUM_CLASSES = 1 + len(synthetic.SHAPES)  # background + shapes


def load_shape_data(root: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """ImageNet-normalized images (N, S, S, 3) and per-pixel shape labels (N, S, S) int32."""
    root = Path(root)
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


class SwinShapeClassifier(nn.Module):
    """Swin stages → linear → resized to the 1/4 grid and summed → ReLU → linear classifier."""

    swin: dict[str, Any]
    width: int = 64

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        feats = SwinTransformer.from_config(self.swin)(x)  # params under SwinTransformer_0
        grid = feats[0].shape[1:3]
        h = sum(resize_bilinear_align_corners(nn.Dense(self.width)(f), grid, axes=(1, 2))
                for f in feats)
        return nn.Dense(NUM_CLASSES)(nn.relu(h))  # (B, H/4, W/4, classes)


def foreground_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Share of foreground pixels whose argmax class is right (logits resized to the labels)."""
    full = resize_bilinear_align_corners(logits, labels.shape[1:3], axes=(1, 2))
    fg = labels > 0
    return ((full.argmax(-1) == labels) & fg).sum() / jnp.maximum(fg.sum(), 1)


def train_shape_classifier(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, *, steps: int, batch: int = 16,
    lr: float | optax.Schedule = 1e-3, num_val: int = 64, evals: int = 4, seed: int = 0,
    log: bool = True,
) -> tuple[Any, list[dict[str, float]], float]:
    """AdamW on per-pixel cross-entropy; returns (params, [{step, loss, val_fg_acc}], s/step).

    The last ``num_val`` images are held out for the foreground accuracy, measured ``evals``
    times over the run. The first (compiling) step is left out of the time per step.
    """
    if steps < 1 or len(images) <= num_val:
        raise ValueError(f"need steps >= 1 and more than {num_val} images, got {steps}, "
                         f"{len(images)}")
    train_x, train_y = images[:-num_val], labels[:-num_val]
    val_x, val_y = jnp.asarray(images[-num_val:]), jnp.asarray(labels[-num_val:])
    params = model.init(jax.random.PRNGKey(seed), val_x[:1])
    tx = optax.adamw(lr)
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
        t_train += time.perf_counter() - t0 if i > 1 else 0.0
        if i in marks:
            acc = float(evaluate(params, val_x, val_y))
            curve.append({"step": i, "loss": float(loss), "val_fg_acc": acc})
            if log:
                print(f"  step {i}: loss {float(loss):.3f}, held-out foreground accuracy "
                      f"{acc:.3f}", flush=True)
    return params, curve, t_train / max(steps - 1, 1)


def pretrain_swin(swin: dict[str, Any], *, steps: int, num_images: int, image_size: int,
                  seed: int = 7, data_dir: str | None = None, evals: int = 8,
                  log: bool = True) -> tuple[Any, list[dict[str, float]]]:
    """Generate shapes (seed ``seed``), train; returns (Swin params, accuracy curve)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = data_dir or tmp
        if not synthetic.is_complete(root):
            synthetic.generate(root, num_images, image_size, seed=seed)
        images, labels = load_shape_data(root)
    warmup = max(1, min(100, steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, warmup, max(steps, warmup + 1))
    model = SwinShapeClassifier(dict(swin))
    params, curve, _ = train_shape_classifier(
        model, images, labels, steps=steps, lr=schedule, num_val=max(4, len(images) // 40),
        evals=evals, log=log)
    return jax.device_get(params["params"]["SwinTransformer_0"]), curve


def main() -> None:
    """Command-line entry point (absl flags; the config takes ``--config.x=y`` overrides, so the
    pretrained Swin can match a training run's ``--config.model.swin.*`` overrides)."""
    from absl import app, flags
    from ml_collections import config_flags

    from vipa_jax.weights.swin import save_swin_params

    # Defined here, not at import: the library functions above are imported by tests and
    # benchmarks next to other absl entry points.
    config = config_flags.DEFINE_config_file(
        "config", "configs/synthetic.py", "Config file whose model.swin is pretrained.")
    out = flags.DEFINE_string("out", None, "Output .safetensors.", required=True)
    steps = flags.DEFINE_integer("steps", 2000, "Training steps.")
    num_images = flags.DEFINE_integer("num_images", 3000, "Synthetic images to generate.")
    seed = flags.DEFINE_integer("seed", 7, "Synthetic data seed (the demo's data: 0).")
    data_dir = flags.DEFINE_string("data_dir", None, "Keep the generated images here.")
    ape = flags.DEFINE_bool(
        "ape", False, "Pretrain with the config's ape table. Off by default: like an ImageNet "
        "Swin-B, the shipped weights have none and fine-tuning adds the config's (sine) table.")

    def run(argv: list[str]) -> None:
        del argv
        t0 = time.time()
        swin = config.value.model.swin.to_dict()
        if not ape.value:
            swin["ape"] = False
        params, curve = pretrain_swin(
            swin, steps=steps.value, num_images=num_images.value,
            image_size=config.value.model.image_size, seed=seed.value, data_dir=data_dir.value)
        path = save_swin_params(params, out.value)
        print(f"wrote {path}: held-out foreground accuracy {curve[-1]['val_fg_acc']:.3f} after "
              f"{steps.value} steps ({time.time() - t0:.0f} s)")

    app.run(run)


if __name__ == "__main__":
    main()
