"""Train VIPA: ``python train.py --config configs/X.py --workdir DIR [--config.a.b=v ...]``.

Rerunning the same command resumes from the newest checkpoint in ``DIR/checkpoints``.
Multi-host: ``--distributed`` (or ``VIPA_DISTRIBUTED=1``) calls ``jax.distributed.initialize``
(auto-detected cluster, or ``--coordinator_address/--num_processes/--process_id``).
"""

from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

from vipa_jax.train import sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, logs).")
_INIT_DISTRIBUTED = sharding.define_distributed_flags()
_NO_EVAL = flags.DEFINE_bool("no_eval", False, "Skip periodic evaluation.")
flags.mark_flags_as_required(["config", "workdir"])


def _evaluate_fn(config):
    """Periodic evaluation hook from eval.py's library (None if unavailable or disabled)."""
    if _NO_EVAL.value or config.data.get("factory", None):
        return None
    try:
        from vipa_jax.evaluate import make_train_evaluator  # eval library (other helper)
    except ImportError:
        logging.warning("vipa_jax.evaluate.make_train_evaluator not available: no periodic eval")
        return None
    return make_train_evaluator(config)


def main(argv: list[str]) -> None:
    """Entry point."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _INIT_DISTRIBUTED()  # before any JAX computation
    import jax

    from vipa_jax.backend import enable_compilation_cache
    from vipa_jax.train.loop import train_and_evaluate

    logging.getLogger().setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:  # orbax logs every save step at INFO
        handler.addFilter(lambda r: r.levelno >= logging.WARNING or "/orbax/" not in r.pathname)
    config = _CONFIG.value
    cache = enable_compilation_cache(config.get("compilation_cache_dir", ""))
    logging.info("JAX %s: process %d/%d, %d local / %d global devices; compilation cache %s",
                 jax.__version__,
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), cache or "off")
    train_and_evaluate(config, _WORKDIR.value, evaluate_fn=_evaluate_fn(config))


if __name__ == "__main__":
    app.run(main)
