"""`make demo`: synthetic referring data → train a small VIPA → evaluate → overlay PNGs.

    python demo.py [--config configs/synthetic.py] [--workdir workdirs/demo] [--out demo_out]

1. Generates the built-in synthetic referring dataset (refer layout) into `config.data.root`.
2. Trains `configs/synthetic.py` (tiny Swin + the real MiniLM text encoder) with train.py's loop;
   rerunning resumes from the last checkpoint (a finished run is not retrained).
3. Evaluates val and the held-out `unseen` split through eval.py's code path (both protocols),
   writes `results.json` / `results.md` and per-expression CSVs to `--out`, and prints mIoU per
   expression family (attribute, size, extreme, relation) for synthetic data.
4. Writes prediction overlays for a few val and `unseen` expressions to `--out`.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py", "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "Training directory.")
_OUT = flags.DEFINE_string("out", "demo_out", "Where results and overlays go.")
_NUM_OVERLAYS = flags.DEFINE_integer("num_overlays", 4, "Overlays per split.")


def write_overlays(loaded, dataset, count: int, out_dir: Path, prefix: str) -> list[Path]:
    """Overlay PNGs (prediction at the original size, the expression as caption) of records 0..n."""
    from vipa_jax.predict import Predictor
    from vipa_jax.viz import overlay, save_png

    predictor = Predictor(loaded.model, loaded.variables, loaded.tokenizer,
                          loaded.config.model.image_size)
    paths = []
    for index in range(count):
        pred = predictor(dataset.load_image(index), dataset[index].sentence)
        paths.append(save_png(overlay(pred.image, pred.mask, f"{pred.text}  [{prefix}]"),
                              out_dir / f"{prefix}_{index}.png"))
    return paths


def per_type_markdown(out_dir: Path, splits: tuple[str, ...], protocol: str = "lavt") -> str:
    """mIoU (%) and count per synthetic expression family, from the per-expression CSVs."""
    from vipa_jax.data.synthetic import EXPRESSION_TYPES, expression_type

    lines = ["| split | " + " | ".join(EXPRESSION_TYPES) + " |",
             "|---|" + "---|" * len(EXPRESSION_TYPES)]
    for split in splits:
        ious: dict[str, list[float]] = {t: [] for t in EXPRESSION_TYPES}
        with open(out_dir / f"per_sample_{split}_{protocol}.csv", newline="",
                  encoding="utf-8") as f:
            for row in csv.DictReader(f):
                ious[expression_type(row["sentence"])].append(float(row["iou"]))
        cells = [f"{100 * sum(v) / len(v):.1f} ({len(v)})" if v else "-" for v in ious.values()]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """Train, evaluate and visualise the demo model."""
    del argv
    from vipa_jax.backend import enable_compilation_cache
    from vipa_jax.data import pipeline
    from vipa_jax.evaluate import evaluate_splits, make_train_evaluator, results_markdown
    from vipa_jax.export import load_checkpoint
    from vipa_jax.train.loop import train_and_evaluate

    logging.getLogger().setLevel(logging.WARNING)
    config = _CONFIG.value
    cache = enable_compilation_cache(config.get("compilation_cache_dir", ""))
    print(f"[demo] XLA compilation cache: {cache or 'off'}", flush=True)
    out = Path(_OUT.value)
    t0 = time.time()
    print(f"[demo] data: {config.data.root} (generated on first use)", flush=True)
    splits = tuple(config.data.eval_splits)
    datasets = {s: pipeline.load_dataset(config.data, s) for s in splits}
    print("[demo] " + ", ".join(f"{s}: {len(d)} expressions" for s, d in datasets.items()))

    print(f"[demo] training {config.train.total_steps} steps into {_WORKDIR.value}", flush=True)
    train_and_evaluate(config, _WORKDIR.value, evaluate_fn=make_train_evaluator(config))
    t_train = time.time() - t0

    loaded = load_checkpoint(Path(_WORKDIR.value) / "checkpoints")
    print(f"[demo] evaluating checkpoint step {loaded.step}", flush=True)
    results = evaluate_splits(
        loaded.model, loaded.variables, loaded.tokenizer, config.data, splits,
        batch_size=int(config.eval.batch_size), image_size=config.model.image_size,
        protocol="both", out_dir=out, checkpoint=loaded.path, step=loaded.step,
        datasets=datasets, per_sample_csv=True,
    )
    print(results_markdown(results, loaded.path, loaded.step))
    if config.data.source == "synthetic":
        print("mIoU (%) per expression family (count):\n" + per_type_markdown(out, splits))
    written = []
    for split, ds in datasets.items():
        written += write_overlays(loaded, ds, min(_NUM_OVERLAYS.value, len(ds)),
                                  out / "overlays", prefix=split)
    print(f"[demo] {len(written)} overlays in {out / 'overlays'}; results in {out}/results.md")
    print(f"[demo] done in {time.time() - t0:.0f} s (training {t_train:.0f} s)")


if __name__ == "__main__":
    app.run(main)
