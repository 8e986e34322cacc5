"""Evaluation: oIoU / mIoU / P@X of a VIPA model on referring-segmentation splits.

* :class:`Evaluator` holds one jitted eval step per model (compiled once, reused by the training
  loop's periodic validation). The step runs the model (``train=False``), thresholds the logits at
  0 and returns the ``lavt``-protocol sums of :func:`vipa_jax.metrics.iou_stats`, per-expression
  IoUs and the logits.
* :func:`evaluate` scores one dataset; :func:`evaluate_splits` scores several splits and writes
  ``results.json`` / ``results.md`` (+ per-expression CSVs); :func:`make_train_evaluator` is the
  hook ``train.py`` passes to the loop.

Protocols (see ``vipa_jax/metrics.py``): ``lavt`` scores at the network size against the
nearest-resized mask; ``original`` upsamples each expression's logits (bilinear,
align_corners) to its original (H, W) and compares with ``dataset.original_mask(i)`` on the host.

Batches come from :func:`vipa_jax.data.pipeline.make_eval_batches`: every expression once, the
last batch padded with ``valid=False`` rows that no metric counts. With a ``mesh`` the global
batch is sharded over ``'data'`` (each process loads its own rows); ``lavt`` sums come out of the
jitted step already global; ``original`` sums are computed per process and added across
processes.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vipa_jax import metrics as metrics_lib
from vipa_jax.data import pipeline
from vipa_jax.metrics import RISMetrics, iou_stats, sample_ious
from vipa_jax.train import sharding as shd

log = logging.getLogger(__name__)

PROTOCOL_CHOICES = ("lavt", "original", "both")
DEVICE_KEYS = ("image", "input_ids", "attention_mask", "mask", "valid", "index")
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def protocols_for(protocol: str) -> tuple[str, ...]:
    """'lavt' | 'original' | 'both' -> the protocols to compute."""
    if protocol not in PROTOCOL_CHOICES:
        raise ValueError(f"protocol must be one of {PROTOCOL_CHOICES}, got {protocol!r}")
    return metrics_lib.PROTOCOLS if protocol == "both" else (protocol,)


def _on_mesh(tree: Any, mesh: Mesh) -> bool:
    """True when every leaf is a jax.Array with a NamedSharding on ``mesh``."""
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(
        isinstance(x, jax.Array) and getattr(x.sharding, "mesh", None) == mesh for x in leaves
    )


class Evaluator:
    """A jitted eval step for ``model`` (optionally sharded over ``mesh``) and the split loop."""

    def __init__(self, model: Any, mesh: Mesh | None = None, empty_iou: float = 1.0) -> None:
        if mesh is None and jax.process_count() > 1:
            mesh = shd.make_mesh((-1, 1))
        self.model = model
        self.mesh = mesh
        self.empty_iou = float(empty_iou)
        if mesh is None:
            self._step = jax.jit(self._eval_step)
        else:
            rep, bsh = shd.replicated(mesh), shd.batch_sharding(mesh)
            out = {"logits": bsh, "stats": rep, "ious": rep, "valid": rep, "index": rep}
            self._step = jax.jit(self._eval_step, out_shardings=out)

    def _eval_step(self, variables: Any, batch: dict[str, jax.Array]) -> dict[str, Any]:
        """Forward pass + lavt-protocol sums for one (global) batch."""
        out = self.model.apply(variables, batch["image"], batch["input_ids"],
                               batch["attention_mask"], train=False)
        logits = out["logits"].astype(jnp.float32)  # (B, H, W)
        pred = logits > 0
        valid = batch["valid"].astype(bool)
        return {
            "logits": logits,
            "stats": iou_stats(pred, batch["mask"], valid, empty_iou=self.empty_iou),
            "ious": sample_ious(pred, batch["mask"], self.empty_iou),
            "valid": valid,
            "index": batch["index"],
        }

    def place_variables(self, variables: Any) -> Any:
        """Replicate host/single-device variables over the mesh (sharded ones are kept)."""
        if self.mesh is None or _on_mesh(variables, self.mesh):
            return variables
        return jax.device_put(variables, shd.replicated(self.mesh))

    def with_inference_cache(self, variables: Any, batch: Mapping[str, np.ndarray]) -> Any:
        """`variables` + what inference precomputes from the params for inputs shaped like
        ``batch`` (`vipa.with_inference_cache`): each eval step then skips recomputing it."""
        from vipa_jax.models.vipa import with_inference_cache

        spec = [jax.ShapeDtypeStruct(np.shape(batch[k]), np.asarray(batch[k]).dtype)
                for k in ("image", "input_ids", "attention_mask")]
        return with_inference_cache(self.model, variables, *spec)

    def step(self, variables: Any, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Run the jitted step on one host-local batch (dict of NumPy arrays)."""
        host = {k: np.asarray(batch[k]) for k in DEVICE_KEYS}
        if self.mesh is None:
            return self._step(variables, host)
        return self._step(variables, shd.host_to_global(host, shd.batch_sharding(self.mesh)))

    def local_logits(self, logits: jax.Array) -> np.ndarray:
        """This process's rows of the (possibly globally sharded) logits, as NumPy."""
        if self.mesh is None or jax.process_count() == 1:
            return np.asarray(jax.device_get(logits))
        from jax.experimental import multihost_utils

        local = multihost_utils.global_array_to_host_local_array(
            logits, self.mesh, shd.batch_sharding(self.mesh).spec)
        return np.asarray(local)

    def run(
        self,
        variables: Any,
        dataset: Any,
        tokenizer: Any,
        *,
        batch_size: int,
        image_size: int | Sequence[int],
        protocol: str = "lavt",
        per_sample: bool = False,
        num_workers: int = 0,
        num_threads: int = 2,
        progress: bool = True,
        desc: str = "eval",
    ) -> dict[str, RISMetrics]:
        """Score every expression of ``dataset``; returns {protocol: accumulator}."""
        protos = protocols_for(protocol)
        if len(dataset) == 0:
            raise ValueError(f"cannot evaluate an empty dataset ({dataset!r})")
        if self.mesh is not None:
            shd.check_global_batch(int(batch_size), self.mesh)
        variables = self.place_variables(variables)
        acc = {p: RISMetrics(p, empty_iou=self.empty_iou, keep_per_sample=per_sample)
               for p in protos}
        batches = pipeline.make_eval_batches(
            dataset, tokenizer, global_batch_size=int(batch_size), image_size=image_size,
            shard_index=jax.process_index(), shard_count=jax.process_count(),
            num_workers=num_workers, num_threads=num_threads)
        n_batches = pipeline.num_eval_batches(len(dataset), int(batch_size))
        bar = None
        if progress and jax.process_index() == 0:
            from tqdm import tqdm

            bar = tqdm(total=len(dataset), desc=desc, unit="expr", dynamic_ncols=True, leave=False)
        rows = 0
        try:
            for i in range(n_batches):
                batch = next(batches)
                if i == 0:  # inference: what depends on the params alone, computed once
                    variables = self.with_inference_cache(variables, batch)
                out = self.step(variables, batch)
                if "lavt" in acc:
                    ids = np.asarray(jax.device_get(out["index"])).tolist()
                    acc["lavt"].update(out["stats"], out["ious"], out["valid"], ids)
                if "original" in acc:
                    self._update_original(acc["original"], dataset, batch, out["logits"])
                rows += len(batch["valid"])
                if bar is not None:
                    bar.update(int(np.sum(jax.device_get(out["valid"]))))
        finally:
            if bar is not None:
                bar.close()
        if "original" in acc and jax.process_count() > 1:
            acc["original"] = _allreduce(acc["original"], rows)
        return acc

    def _update_original(self, acc: RISMetrics, dataset: Any, batch: Mapping[str, np.ndarray],
                         logits: jax.Array) -> None:
        """Upsample this process's logits to each original size and score them."""
        valid = np.asarray(batch["valid"], bool)
        index = np.asarray(batch["index"])
        gts = [dataset.original_mask(int(i)) if v else np.zeros((1, 1), np.uint8)
               for i, v in zip(index, valid, strict=True)]
        acc.update_original(self.local_logits(logits), gts, valid, index.tolist())


def _split64(x: np.ndarray) -> np.ndarray:
    """int64 -> (..., 2) int32 (high, low 20 bits): exact through a float32/int32 all-gather."""
    x = np.asarray(x, np.int64)
    return np.stack([x >> 20, x & ((1 << 20) - 1)], axis=-1).astype(np.int32)


def _allreduce(acc: RISMetrics, rows: int) -> RISMetrics:
    """Sum an ``original``-protocol accumulator over processes (exact integer sums)."""
    from jax.experimental import multihost_utils

    ints = np.array([acc.intersection, acc.union, acc.count, *acc.hits.tolist()], np.int64)
    g = np.asarray(multihost_utils.process_allgather(_split64(ints)), np.int64)  # (P, n, 2)
    tot = ((g[..., 0] << 20) + g[..., 1]).sum(0)
    hi = np.float32(acc.iou_sum)
    fl = np.asarray(multihost_utils.process_allgather(
        np.array([hi, np.float32(acc.iou_sum - float(hi))], np.float32)), np.float64)
    out = RISMetrics(acc.protocol, acc.thresholds, acc.empty_iou, acc.keep_per_sample)
    out.intersection, out.union, out.count = int(tot[0]), int(tot[1]), int(tot[2])
    out.hits = tot[3:].astype(np.int64)
    out.iou_sum = float(fl.sum())
    if acc.keep_per_sample:
        idx = np.full((rows,), -1, np.int32)
        iou = np.zeros((rows,), np.float32)
        for j, (i, v) in enumerate(acc.per_sample):
            idx[j], iou[j] = int(i), v
        gi = np.asarray(multihost_utils.process_allgather(idx)).reshape(-1)
        gv = np.asarray(multihost_utils.process_allgather(iou)).reshape(-1)
        out.per_sample = sorted((int(i), float(v)) for i, v in zip(gi, gv, strict=True) if i >= 0)
    return out


def evaluate(
    model: Any,
    variables: Any,
    dataset: Any,
    tokenizer: Any,
    *,
    batch_size: int,
    image_size: int | Sequence[int],
    protocol: str = "lavt",
    mesh: Mesh | None = None,
    per_sample: bool = False,
    num_workers: int = 0,
    num_threads: int = 2,
    progress: bool = True,
    evaluator: Evaluator | None = None,
) -> dict[str, dict[str, Any]]:
    """{protocol: {oIoU, mIoU, P@X, count, protocol}} of ``model`` on ``dataset``.

    With ``per_sample`` each result also holds ``per_sample``: [(record index, IoU), ...].
    Pass ``evaluator`` to reuse its compiled step across calls.
    """
    ev = evaluator if evaluator is not None else Evaluator(model, mesh)
    accs = ev.run(variables, dataset, tokenizer, batch_size=batch_size, image_size=image_size,
                  protocol=protocol, per_sample=per_sample, num_workers=num_workers,
                  num_threads=num_threads, progress=progress,
                  desc=f"eval {getattr(dataset, 'split', '')}".strip())
    results: dict[str, dict[str, Any]] = {}
    for p, acc in accs.items():
        r = acc.result()
        if per_sample:
            r["per_sample"] = list(acc.per_sample)
        results[p] = r
    return results


def write_per_sample_csv(path: str | os.PathLike[str], dataset: Any,
                         per_sample: Sequence[tuple[Any, float]]) -> Path:
    """CSV of one row per expression: index, ref_id, sent_id, image_id, sentence, iou."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["index", "ref_id", "sent_id", "image_id", "sentence", "iou"])
        for i, iou in sorted(per_sample, key=lambda t: int(t[0])):
            r = dataset[int(i)]
            w.writerow([int(i), r.ref_id, r.sent_id, r.image_id, r.sentence, f"{iou:.6f}"])
    return path


def results_markdown(results: Mapping[str, Mapping[str, Mapping[str, Any]]],
                     checkpoint: str | None = None, step: int | None = None) -> str:
    """Markdown: a header (checkpoint, step) and one table per protocol of {split: result}."""
    lines = ["# VIPA evaluation", ""]
    if checkpoint:
        at = f" (step {step})" if step is not None else ""
        lines.append(f"checkpoint: `{checkpoint}`{at}")
        lines.append("")
    protos: list[str] = []
    for per in results.values():
        protos += [p for p in per if p not in protos]
    for p in protos:
        table = {s: per[p] for s, per in results.items() if p in per}
        lines += [f"## protocol `{p}`", "", metrics_lib.results_table_markdown(table)]
    return "\n".join(lines)


def evaluate_splits(
    model: Any,
    variables: Any,
    tokenizer: Any,
    data_config: Any,
    splits: Sequence[str],
    *,
    batch_size: int,
    image_size: int | Sequence[int],
    protocol: str = "lavt",
    out_dir: str | os.PathLike[str] | None = None,
    mesh: Mesh | None = None,
    per_sample_csv: bool = False,
    checkpoint: str | None = None,
    step: int | None = None,
    num_workers: int = 0,
    num_threads: int = 2,
    progress: bool = True,
    datasets: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """{split: {protocol: result (+ step)}} over ``splits``; writes results.json/.md to out_dir.

    Datasets come from ``pipeline.load_dataset(data_config, split)`` unless given in
    ``datasets``. Per-expression CSVs: ``out_dir/per_sample_<split>_<protocol>.csv``.
    """
    if not splits:
        raise ValueError("no splits to evaluate")
    if per_sample_csv and out_dir is None:
        raise ValueError("per_sample_csv needs an out_dir")
    ev = Evaluator(model, mesh)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    main = jax.process_index() == 0
    for split in splits:
        if datasets is not None and split in datasets:
            ds = datasets[split]
        else:
            ds = pipeline.load_dataset(data_config, split)
        res = evaluate(model, variables, ds, tokenizer, batch_size=batch_size,
                       image_size=image_size, protocol=protocol, per_sample=per_sample_csv,
                       num_workers=num_workers, num_threads=num_threads, progress=progress,
                       evaluator=ev)
        for p, r in res.items():
            per = r.pop("per_sample", None)
            r["step"] = step
            if per is not None and main:
                write_per_sample_csv(Path(out_dir) / f"per_sample_{split}_{p}.csv", ds, per)
        results[split] = res
        log.info("%s: %s", split, {p: {k: r[k] for k in ("oIoU", "mIoU", "count")}
                                   for p, r in res.items()})
    if out_dir is not None and main:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        doc = {"checkpoint": checkpoint, "step": step, "splits": results}
        (out / RESULTS_JSON).write_text(json.dumps(metrics_lib.to_jsonable(doc), indent=2) + "\n")
        (out / RESULTS_MD).write_text(results_markdown(results, checkpoint, step))
    return results


def train_metrics(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, float]:
    """{split: {protocol: result}} -> flat scalars '<split>_oIoU' (first protocol) and
    '<split>_original_oIoU' (the second one, with protocol 'both')."""
    flat: dict[str, float] = {}
    for split, per in results.items():
        for n, (p, r) in enumerate(per.items()):
            prefix = split if n == 0 else f"{split}_{p}"
            for k, v in r.items():
                if k in ("oIoU", "mIoU") or k.startswith("P@"):
                    flat[f"{prefix}_{k}"] = float(v)
    return flat


def make_train_evaluator(config: Any) -> Callable[[Any], dict[str, float]]:
    """``fn(train_state) -> {'val_oIoU', 'val_mIoU', 'val_P@0.5', ...}`` for the training loop.

    Uses ``config.data.eval_splits``, ``config.eval.batch_size``/``protocol`` and the training
    mesh; the model is built once and its eval step compiled once. Datasets load on first use.
    """
    from vipa_jax.data.tokenizer import Tokenizer, vocab_for
    from vipa_jax.train.loop import build_model

    model = build_model(config)
    mesh = shd.make_mesh(config.sharding.mesh_shape)
    ev = Evaluator(model, mesh)
    tokenizer = Tokenizer(vocab_for(config), max_length=int(config.model.max_tokens))
    splits = tuple(config.data.eval_splits)
    datasets: dict[str, Any] = {}
    protocol = config.eval.get("protocol", "lavt")

    def fn(state: Any) -> dict[str, float]:
        variables = {"params": state.params}
        if jax.tree.leaves(state.batch_stats):
            variables["batch_stats"] = state.batch_stats
        results = {}
        for split in splits:
            if split not in datasets:
                datasets[split] = pipeline.load_dataset(config.data, split)
            results[split] = evaluate(
                model, variables, datasets[split], tokenizer,
                batch_size=int(config.eval.batch_size), image_size=config.model.image_size,
                protocol=protocol, progress=False, evaluator=ev,
                **pipeline.loader_options(config.data))
        return train_metrics(results)

    return fn


__all__ = ["Evaluator", "PROTOCOL_CHOICES", "evaluate", "evaluate_splits",
           "make_train_evaluator", "protocols_for", "results_markdown", "train_metrics",
           "write_per_sample_csv"]
