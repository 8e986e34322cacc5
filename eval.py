"""Evaluate VIPA: ``python eval.py --checkpoint DIR [--config configs/X.py] [--splits val,testA]
[--protocol lavt|original|both] [--out DIR] [--per_sample_csv]``.

DIR is an inference bundle (``python -m vipa_jax.export``) or a training workdir / checkpoints
folder / step folder (detected). The model section always comes from the checkpoint (it must
match the weights); ``--config`` (optional) supplies the data and eval sections, e.g. to point at
another dataset root. Prints a markdown table; ``--out`` also writes results.json, results.md
and with ``--per_sample_csv`` one CSV per split and protocol. Multi-host: run it on every host
with ``--distributed`` (as train.py); each process scores its shard and the metrics are
all-reduced.
"""

from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

from vipa_jax.train import sharding as shd

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file for data/eval settings.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Bundle or training checkpoint.")
_SPLITS = flags.DEFINE_list("splits", None, "Splits (default: config.data.eval_splits).")
_PROTOCOL = flags.DEFINE_enum("protocol", None, ["lavt", "original", "both"],
                              "Protocol (default: config.eval.protocol).")
_OUT = flags.DEFINE_string("out", None, "Folder for results.json / results.md / CSVs.")
_PER_SAMPLE = flags.DEFINE_bool("per_sample_csv", False, "Write per-expression IoU CSVs.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (training checkpoints only).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global eval batch (default: config.eval).")
_VOCAB = flags.DEFINE_string("vocab", None, "vocab.txt override.")
_INIT_DISTRIBUTED = shd.define_distributed_flags()  # multi-host: every process runs eval.py
flags.mark_flags_as_required(["checkpoint"])


def main(argv: list[str]) -> None:
    """Entry point."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _INIT_DISTRIBUTED()  # before any JAX computation
    import jax

    from vipa_jax.backend import DEFAULT_COMPILATION_CACHE_DIR, enable_compilation_cache
    from vipa_jax.data import pipeline
    from vipa_jax.evaluate import evaluate_splits, results_markdown
    from vipa_jax.export import load_any

    logging.getLogger().setLevel(logging.INFO)
    loaded = load_any(_CHECKPOINT.value, _STEP.value, _VOCAB.value)
    config = loaded.config
    if _CONFIG.value is not None:
        user = _CONFIG.value
        if user.model.to_dict() != config.model.to_dict():
            logging.warning("--config's model section differs from the checkpoint's; using the "
                            "checkpoint's (it must match the weights)")
        config.data, config.eval = user.data, user.eval
        if "sharding" in user:
            config.sharding = user.sharding
    enable_compilation_cache((_CONFIG.value or config).get("compilation_cache_dir",
                                                           DEFAULT_COMPILATION_CACHE_DIR))
    splits = _SPLITS.value or list(config.data.eval_splits)
    protocol = _PROTOCOL.value or config.eval.get("protocol", "lavt")
    batch = _BATCH.value or int(config.eval.batch_size)
    mesh = shd.make_mesh(tuple(config.get("sharding", {}).get("mesh_shape", (-1, 1))))
    results = evaluate_splits(
        loaded.model, loaded.variables, loaded.tokenizer, config.data, splits,
        batch_size=batch, image_size=config.model.image_size, protocol=protocol,
        out_dir=_OUT.value, mesh=mesh, per_sample_csv=_PER_SAMPLE.value,
        checkpoint=loaded.path, step=loaded.step, **pipeline.loader_options(config.data))
    if jax.process_index() == 0:  # every process holds the same all-reduced results
        print(results_markdown(results, loaded.path, loaded.step))


if __name__ == "__main__":
    app.run(main)
