"""Orbax checkpoints: train state + data-iterator state + config/meta JSON in one step folder.

Layout: ``<workdir>/checkpoints/<step>/{state,data_iter,meta}``. Saves are atomic (orbax
writes to a temporary folder and renames it on commit; half-written folders are ignored and
cleaned up on the next start). Retention: the last ``keep`` checkpoints plus (with
``keep_best``) the best one by ``best_metric`` (default ``val_mIoU``, higher is better) among
the checkpoints saved with metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from vipa_jax.metrics import to_jsonable

DEFAULT_BEST_METRIC = "val_mIoU"


class Checkpointer:
    """Thin wrapper around ``ocp.CheckpointManager`` for VIPA training runs."""

    def __init__(self, directory: str | Path, keep: int = 3, keep_best: bool = True,
                 best_metric: str = DEFAULT_BEST_METRIC, async_save: bool = True):
        """Create (or reopen) the manager in ``directory``."""
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        policies: list[pp.PreservationPolicy] = [pp.LatestN(n=max(int(keep), 1))]
        if keep_best:
            policies.append(pp.BestN(get_metric_fn=lambda m: float(m[best_metric]), n=1,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save,
            preservation_policy=pp.AnyPreservationPolicy(policies),
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data_iter", "meta"))

    def latest_step(self) -> int | None:
        """Step of the newest committed checkpoint (None if there is none)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all kept checkpoints."""
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any = None, meta: dict | None = None,
             metrics: dict[str, float] | None = None, force: bool = True) -> bool:
        """Save ``state`` (+ iterator state and JSON ``meta``); ``metrics`` feed best-keeping."""
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state),
                                 "meta": ocp.args.JsonSave(to_jsonable(meta or {}))}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        if metrics is not None and self.best_metric not in metrics:
            metrics = None  # no ranking value: treat as a plain checkpoint
        return self.manager.save(int(step), args=ocp.args.Composite(**items),
                                 metrics=to_jsonable(metrics) if metrics else None, force=force)

    def saved_tree(self, step: int) -> Any:
        """The tree of the ``state`` item saved at ``step``, with orbax's metadata as leaves
        (nothing read but the metadata)."""
        return ocp.PyTreeCheckpointHandler().metadata(self.directory / str(step) / "state").tree

    def restore(self, abstract_state: Any, data_iter: Any = None,
                step: int | None = None) -> tuple[Any, dict]:
        """Restore (state, meta) at ``step`` (default latest); restores ``data_iter`` in place.

        ``abstract_state``: pytree of ``jax.ShapeDtypeStruct`` with the target shardings.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state),
                                 "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        r = self.manager.restore(step, args=ocp.args.Composite(**items))
        return r["state"], dict(r["meta"] or {})

    def wait(self) -> None:
        """Block until pending async saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for a concrete or abstract pytree."""
    def one(x: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree.map(one, tree)
