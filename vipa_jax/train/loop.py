"""Training loop: build, restore or init (+ pretrained), jitted steps, logs, eval, checkpoints.

The couplings to the rest of the project live in four small functions (each overridable from the
config with a ``"module:attr"`` factory string, which is how the tests plug in a stand-in):
``build_model`` (``config.model.factory``), ``build_loss`` (``config.loss.factory``),
``build_train_data`` (``config.data.factory``) and ``init_pretrained``.

Resumption: if ``<workdir>/checkpoints`` holds a checkpoint, state and data-iterator position
are restored from the newest one; the per-step RNG is ``fold_in(PRNGKey(seed), step)``, so a
run killed at any moment and restarted with the same command ends with the same parameters as
an uninterrupted run. SIGTERM (preemption) makes the loop save a checkpoint and return.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from vipa_jax.train import optim as optim_lib
from vipa_jax.train import sharding as shd
from vipa_jax.train import step as step_lib
from vipa_jax.train.checkpoint import Checkpointer
from vipa_jax.weights.bert import resolve_bert_folder

log = logging.getLogger(__name__)

EvaluateFn = Callable[[step_lib.TrainState], dict[str, float]]
ImageFn = Callable[[step_lib.TrainState, int], dict[str, np.ndarray]]


# --- couplings -----------------------------------------------------------------------------
def resolve(spec: str) -> Any:
    """Import ``"package.module:attr"``."""
    if ":" not in spec:
        raise ValueError(f"factory {spec!r} must look like 'module:attr'")
    mod, attr = spec.split(":", 1)
    return getattr(importlib.import_module(mod), attr)


def build_model(config: Any) -> Any:
    """The Flax module (VIPA unless ``config.model.factory`` names another builder)."""
    factory = config.model.get("factory", None)
    if factory:
        return resolve(factory)(config.model)
    from vipa_jax.models.vipa import build_model as build_vipa

    return build_vipa(config.model)


def build_loss(config: Any) -> step_lib.LossFn:
    """``loss(outputs, batch) -> (total, parts)`` (``vipa_loss`` with ``config.loss``)."""
    factory = config.loss.get("factory", None)
    if factory:
        fn = resolve(factory)
    else:
        from vipa_jax.losses import vipa_loss as fn
    loss_cfg = config.loss

    def loss(outputs: dict, batch: dict) -> tuple[jax.Array, dict]:
        total, parts = fn(outputs, batch, loss_cfg)
        return total, {k: v for k, v in parts.items() if k != "total"}

    return loss


def build_train_data(config: Any, process_index: int, process_count: int,
                     per_host_batch: int) -> tuple[Iterator[dict[str, np.ndarray]], int]:
    """(checkpointable per-host batch iterator, steps per epoch)."""
    factory = config.data.get("factory", None)
    if factory:
        return resolve(factory)(config, process_index, process_count, per_host_batch)
    from vipa_jax.data import pipeline
    from vipa_jax.data.tokenizer import Tokenizer, vocab_for

    tok = Tokenizer(vocab_for(config), max_length=config.model.max_tokens)
    ds = pipeline.load_dataset(config.data, config.data.train_split)
    it = pipeline.make_train_iterator(
        ds, tok, global_batch_size=config.train.batch_size, image_size=config.model.image_size,
        seed=config.seed, shard_index=process_index, shard_count=process_count,
        **pipeline.loader_options(config.data))
    return it, max(len(ds.objects) // config.train.batch_size, 1)


def _subtree(params: dict, path: str) -> dict:
    node = params
    for k in path.split("/"):
        if k not in node:
            raise KeyError(f"no parameter subtree {path!r} (missing {k!r}; have {list(node)})")
        node = node[k]
    return node


def _set_subtree(params: dict, path: str, value: Any) -> dict:
    keys = path.split("/")
    out = dict(params)
    node = out
    for k in keys[:-1]:
        node[k] = dict(node[k])
        node = node[k]
    node[keys[-1]] = value
    return out


def repo_relative(path: str) -> str:
    """``path`` as given if it exists (or is absolute), else relative to the repository root
    when it exists there (configs name shipped assets such as ``assets/...`` that way)."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = Path(__file__).resolve().parents[2] / path
    return str(candidate) if candidate.exists() else path


def init_pretrained(params: dict, config: Any) -> dict:
    """Load Swin (``train.init_swin``) / BERT (``train.init_bert``) weights into host params.

    Subtree locations: ``train.swin_params_path`` (default ``encoder/backbone``) and
    ``train.bert_params_path`` (default ``encoder/text_encoder``). With
    ``model.lang_later_from_pretrained``, ``encoder/lang_layers_{i}_{j}`` are initialized from
    BERT layers ``lang_stage_layers[0] + ...`` in order. Unset paths leave random init.
    """
    swin = config.train.get("init_swin", "")
    bert = config.train.get("init_bert", "")
    if swin:
        try:
            from vipa_jax.weights.swin import load_swin_params
        except ImportError as e:
            raise RuntimeError(f"config.train.init_swin={swin!r} but the Swin loader "
                               f"(vipa_jax.weights.swin) cannot be imported: {e}") from e
        where = config.train.get("swin_params_path", "encoder/backbone")
        loaded, report = load_swin_params(repo_relative(swin), None, _subtree(params, where))
        log.info("Swin weights from %s (%s): %d tensors, %d missing", swin,
                 report.source_format, len(report.loaded), len(report.missing))
        params = _set_subtree(params, where, loaded)
    if bert:
        try:
            from vipa_jax.weights.bert import load_bert_layer, load_bert_params, read_checkpoint
        except ImportError as e:
            raise RuntimeError(f"config.train.init_bert={bert!r} but the BERT loader "
                               f"(vipa_jax.weights.bert) cannot be imported: {e}") from e
        folder = resolve_bert_folder(bert)
        where = config.train.get("bert_params_path", "encoder/text_encoder")
        target = _subtree(params, where)
        n = len(target.get("encoder", {}).get("layer", {}))
        loaded, _ = load_bert_params(folder, target, layers=n)
        params = _set_subtree(params, where, loaded)
        log.info("BERT weights from %s: embeddings + %d layers", folder, n)
        if config.model.get("lang_later_from_pretrained", False):
            # stages 2-4's new BERT layers start from pretrained layers n, n+1, ... in order
            enc_path = where.rsplit("/", 1)[0] if "/" in where else ""
            flat = read_checkpoint(folder)  # read once for every layer
            src = n
            for i, count in enumerate(tuple(config.model.lang_stage_layers)[1:]):
                for j in range(count):
                    full = f"{enc_path}/lang_layers_{i}_{j}" if enc_path else f"lang_layers_{i}_{j}"
                    params = _set_subtree(
                        params, full, load_bert_layer(flat, src, _subtree(params, full)))
                    log.info("BERT layer %d -> %s", src, full)
                    src += 1
    return params


def make_overlay_image_fn(model: Any, batch: dict[str, np.ndarray], captions: list[str],
                          mean: np.ndarray | None = None, std: np.ndarray | None = None,
                          ) -> ImageFn:
    """image_fn drawing predicted masks (logits > 0) on a fixed batch via ``vipa_jax.viz``.

    ``batch`` holds normalized images (undone with ``mean``/``std``, default ImageNet). Every
    process must call it (the forward is a collective); only process 0 writes the images.
    """
    from vipa_jax.viz import overlay

    if mean is None or std is None:
        from vipa_jax.data.pipeline import IMAGENET_MEAN, IMAGENET_STD

        mean, std = IMAGENET_MEAN, IMAGENET_STD
    predict = jax.jit(step_lib.make_predict_fn(model))
    images = np.clip((np.asarray(batch["image"]) * std + mean) * 255.0, 0, 255).astype(np.uint8)
    inputs = {k: np.asarray(batch[k]) for k in step_lib.MODEL_INPUTS}

    def image_fn(state: step_lib.TrainState, step: int) -> dict[str, np.ndarray]:
        logits = np.asarray(jax.device_get(predict(state, inputs)["logits"]))
        return {f"predictions/{i}": overlay(images[i], logits[i] > 0, captions[i])
                for i in range(len(captions))}

    return image_fn


# --- helpers -------------------------------------------------------------------------------
def sample_batch(config: Any, batch_size: int = 1) -> dict[str, np.ndarray]:
    """Zeros with the model's input shapes (for init / eval_shape)."""
    s, length = config.model.image_size, config.model.max_tokens
    return {"image": np.zeros((batch_size, s, s, 3), np.float32),
            "input_ids": np.zeros((batch_size, length), np.int32),
            "attention_mask": np.ones((batch_size, length), np.int32)}


def total_steps(config: Any, steps_per_epoch: int) -> int:
    """``train.total_steps`` if > 0 else ``num_epochs * steps_per_epoch``."""
    t = int(config.train.get("total_steps", 0) or 0)
    return t if t > 0 else int(config.train.num_epochs) * int(steps_per_epoch)


class _MetricsWriter:
    """metrics.jsonl + TensorBoard (process 0 only)."""

    def __init__(self, workdir: Path, enabled: bool):
        self.enabled = enabled
        self.tb = None
        if enabled:
            self.jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(workdir / "tb"))
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                log.warning("tensorboardX unavailable: no TensorBoard logs")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        if self.enabled and self.tb is not None:
            for tag, img in images.items():
                self.tb.add_image(tag, np.asarray(img), step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


class _Preemption:
    """SIGTERM -> flag (single host) / JAX's preemption sync point (multi-host)."""

    def __init__(self) -> None:
        self.flag = False
        self.multi = jax.process_count() > 1
        self._old = None
        if not self.multi:
            self._old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM received: saving a checkpoint and exiting")
        self.flag = True

    def reached(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils

            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # preemption service not started (no distributed init)
                return False
        return self.flag

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


class NonFiniteError(FloatingPointError):
    """Raised when a step produced a non-finite loss or gradient (and skipping is off)."""


# --- the loop ------------------------------------------------------------------------------
def check_saved_params(ckpt: Checkpointer, step: int, abstract_params: Any) -> bool:
    """Whether the checkpoint at ``step`` holds the config's parameter tree with Swin's block
    pairs in the other layout (`stacked_params`), which resuming converts
    (`restore_other_layout`); False when it holds the config's tree. Any other difference is a
    ValueError naming the parameters on each side, instead of orbax's dump of both trees."""
    from flax.traverse_util import flatten_dict

    from vipa_jax.models.swin import has_block_pairs, stack_block_pairs, unstack_block_pairs

    def paths(tree: Any) -> set[str]:
        return {"/".join(k) for k in flatten_dict(dict(tree))}

    saved = ckpt.saved_tree(step).get("params", {})
    have, want = paths(saved), paths(abstract_params)
    if have == want:
        return False
    stacked = has_block_pairs(saved)
    if stacked != has_block_pairs(abstract_params):
        convert = stack_block_pairs if stacked else unstack_block_pairs
        if paths(jax.eval_shape(convert, abstract_params)) == have:
            return True

    only_saved, only_config = sorted(have - want), sorted(want - have)
    msg = (f"{ckpt.directory / str(step)}: the checkpoint's params do not match the model the "
           f"config builds: {len(only_saved)} only in the checkpoint {only_saved[:4]}, "
           f"{len(only_config)} only in the config {only_config[:4]}")
    raise ValueError(msg)


def restore_other_layout(ckpt: Checkpointer, step: int, abstract_state: Any, optim_cfg: Any,
                         total_steps: int, shardings_of: Callable[[Any], Any],
                         data_iter: Any = None) -> Any:
    """The train state saved at ``step`` with Swin's block pairs in the other layout than
    ``abstract_state``'s (`check_saved_params` said so), converted to it: params and the
    optimizer's moments alike (`swin.relayout_block_pairs`), on the devices, with
    ``shardings_of(abstract_state)``; ``data_iter`` is restored in place."""
    from vipa_jax.models import swin

    stacked = swin.has_block_pairs(abstract_state.params)
    convert = swin.unstack_block_pairs if stacked else swin.stack_block_pairs
    saved_params = jax.eval_shape(convert, abstract_state.params)
    tx, _ = optim_lib.make_optimizer(optim_cfg, saved_params, total_steps)
    saved = abstract_state.replace(params=saved_params,
                                   opt_state=jax.eval_shape(tx.init, saved_params))
    restored, _ = ckpt.restore(_with_shardings(saved, shardings_of(saved)), data_iter, step=step)
    relayout = functools.partial(swin.relayout_block_pairs, template=abstract_state)
    with warnings.catch_warnings():  # the moved blocks' buffers have other shapes: not reused
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        state = jax.jit(relayout, out_shardings=shardings_of(abstract_state),
                        donate_argnums=0)(restored)
    log.warning("%s stores Swin's block pairs %sstacked; converted them (params and optimizer "
                "state) for model.swin.stacked_params=%s, the layout of the next checkpoints",
                ckpt.directory / str(step), "" if not stacked else "un", stacked)
    return state


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    """``abstract``'s ShapeDtypeStructs with ``shardings`` (a restore target)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def train_and_evaluate(
    config: Any,
    workdir: str | os.PathLike,
    *,
    evaluate_fn: Callable[..., dict[str, float]] | None = None,
    image_fn: ImageFn | None = None,
    model: Any = None,
    loss_fn: step_lib.LossFn | None = None,
) -> step_lib.TrainState:
    """Train (resuming from ``workdir``); returns the final state.

    evaluate_fn(state) -> {'val_oIoU': ..., 'val_mIoU': ...}; called every
    ``train.eval_every`` steps (0 = once per epoch) and at the end; ``val_mIoU`` ranks the best
    checkpoint. image_fn(state, step) -> {tag: uint8 HWC}; written to TensorBoard every
    ``train.image_every`` steps (0 = at evaluations).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    xla_options = step_lib.step_compiler_options(config)  # errors first
    mesh = shd.make_mesh(config.sharding.mesh_shape)
    global_batch = int(config.train.batch_size)
    per_host = shd.check_global_batch(global_batch, mesh)
    model = model if model is not None else build_model(config)
    loss_fn = loss_fn if loss_fn is not None else build_loss(config)
    data_iter, steps_per_epoch = build_train_data(
        config, jax.process_index(), jax.process_count(), per_host)
    n_steps = total_steps(config, steps_per_epoch)
    if n_steps <= 0:
        raise ValueError("nothing to train: set train.total_steps or train.num_epochs > 0")

    # --- state: abstract -> shardings -> restore or init ---------------------------------
    rng = jax.random.PRNGKey(int(config.seed))
    init_rng, base_rng = jax.random.split(rng)
    sample = sample_batch(config)
    abstract_vars = jax.eval_shape(lambda: step_lib.init_variables(model, init_rng, sample))
    abstract_params = abstract_vars["params"]
    tx, schedule = optim_lib.make_optimizer(config.optim, abstract_params, n_steps)
    create = functools.partial(step_lib.create_train_state, model, tx)
    abstract_state = jax.eval_shape(lambda: create(init_rng, sample))
    sc = config.sharding
    shardings_of = functools.partial(
        shd.state_shardings, mesh=mesh, fsdp=bool(sc.fsdp),
        fsdp_min_size=int(sc.get("fsdp_min_size", shd.DEFAULT_FSDP_MIN_SIZE)),
        rules=tuple(sc.get("logical_axis_rules", ())), param_axes=tuple(sc.get("param_axes", ())))
    state_sh = shardings_of(abstract_state)
    rep, batch_sh = shd.replicated(mesh), shd.batch_sharding(mesh)

    ck = config.ckpt
    ckpt = Checkpointer(workdir / "checkpoints", keep=ck.keep, keep_best=ck.get("keep_best", True),
                        best_metric=ck.get("best_metric", "val_mIoU"),
                        async_save=ck.get("async_save", True))
    if (latest := ckpt.latest_step()) is not None:
        if check_saved_params(ckpt, latest, abstract_params):
            state = restore_other_layout(ckpt, latest, abstract_state, config.optim, n_steps,
                                         shardings_of, data_iter)
        else:
            state, _ = ckpt.restore(_with_shardings(abstract_state, state_sh), data_iter,
                                    step=latest)
        log.info("resumed from %s at step %d", ckpt.directory, int(state.step))
    else:
        state = jax.jit(lambda: create(init_rng, sample), out_shardings=state_sh)()
        if config.train.get("init_swin", "") or config.train.get("init_bert", ""):
            host = jax.device_get(state.params)
            params = init_pretrained(host, config)
            state = state.replace(params=jax.device_put(params, state_sh.params))
    start = int(jax.device_get(state.step))

    counts, _ = optim_lib.param_summary(abstract_params, config.optim)
    if is_main:
        log.info("parameters:\n%s", optim_lib.format_param_summary(counts))
        log.info("mesh %s, global batch %d (%d per host), %d steps (%d per epoch)",
                 dict(mesh.shape), global_batch, per_host, n_steps, steps_per_epoch)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    trainable = optim_lib.trainable_mask(abstract_params, config.optim)
    parts = step_lib.make_step_parts(
        model, loss_fn, tx, schedule, trainable,
        grad_accum_steps=config.optim.get("grad_accum_steps", 1), micro_batch_sharding=batch_sh,
        finite_guard=config.train.get("finite_guard", "auto"),
        grad_norm=config.train.get("grad_norm", "auto"))
    if config.train.get("split_update", False):
        train_step = step_lib.SplitTrainStep(parts, state_sh, batch_sh, rep, xla_options)
    else:
        train_step = step_lib.jit_train_step(step_lib.compose_step(parts), state_sh, batch_sh,
                                             rep, compiler_options=xla_options)
    base_rng = jax.make_array_from_process_local_data(rep, np.asarray(base_rng))

    # --- loop ----------------------------------------------------------------------------
    tc = config.train
    eval_every = int(tc.get("eval_every", 0) or 0) or steps_per_epoch
    image_every = int(tc.get("image_every", 0) or 0)
    log_every = max(int(tc.get("log_every", 50)), 1)
    ckpt_every = int(ck.get("every_steps", 0) or 0)
    skip_nonfinite = bool(tc.get("skip_nonfinite", False))
    writer = _MetricsWriter(workdir, is_main)
    preempt = _Preemption()
    meta = {"config": config.to_dict()}
    pbar = None
    if is_main and tc.get("progress", True):
        from tqdm import tqdm

        pbar = tqdm(total=n_steps, initial=start, desc="train", dynamic_ncols=True)
    acc: dict[str, list[float]] = {}
    skipped = 0
    t0, last_logged = time.perf_counter(), start
    input_s = 0.0  # waited for the input pipeline since t0

    def consume(step: int, metrics: dict) -> None:
        """Host side of step ``step`` (1-based, i.e. state.step after it)."""
        nonlocal skipped, t0, last_logged, input_s
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if m.pop("finite") < 1.0:
            msg = (f"non-finite loss/gradient at step {step} (loss={m['loss']}, "
                   f"grad_norm={m['grad_norm']}); params and optimizer state were kept")
            if not skip_nonfinite:
                raise NonFiniteError(msg + "; stopping (set train.skip_nonfinite=True to skip)")
            skipped += 1
            log.warning("%s; skipping (%d skipped so far)", msg, skipped)
            return
        for k, v in m.items():
            acc.setdefault(k, []).append(v)
        if pbar is not None:
            pbar.update(step - pbar.n)
        if step % log_every == 0 or step == n_steps:
            dt = time.perf_counter() - t0
            ips = global_batch * (step - last_logged) / max(dt, 1e-9)
            vals = {f"train/{k}": float(np.mean(v)) for k, v in acc.items()}
            vals.update({"train/images_per_s": ips, "train/skipped_steps": float(skipped),
                         # > 0.1: the input pipeline holds training back (data.num_threads)
                         "train/input_wait_frac": min(input_s / max(dt, 1e-9), 1.0)})
            writer.scalars(step, vals)
            if pbar is not None:
                pbar.set_postfix(loss=f"{vals['train/loss']:.4f}", img_s=f"{ips:.1f}")
            acc.clear()
            t0, last_logged, input_s = time.perf_counter(), step, 0.0

    pending = None
    stopped_early = False
    try:
        for i in range(start, n_steps):
            t_in = time.perf_counter()
            batch = shd.host_to_global(next(data_iter), batch_sh)
            input_s += time.perf_counter() - t_in
            state, metrics = train_step(state, batch, base_rng)
            if pending is not None:
                consume(*pending)
            pending = (i + 1, metrics)
            step = i + 1
            is_last = step == n_steps
            do_eval = evaluate_fn is not None and (step % eval_every == 0 or is_last)
            do_images = image_fn is not None and (
                (image_every and step % image_every == 0) or (not image_every and do_eval))
            preempted = preempt.reached(step)
            do_ckpt = is_last or preempted or do_eval or (ckpt_every and step % ckpt_every == 0)
            if not (do_eval or do_images or do_ckpt):
                continue
            consume(*pending)
            pending = None
            eval_metrics = None
            if do_eval:
                eval_metrics = {k: float(v) for k, v in evaluate_fn(state).items()}
                writer.scalars(step, eval_metrics)
                log.info("step %d eval: %s", step, eval_metrics)
            if do_images:
                writer.images(step, image_fn(state, step))
            if do_ckpt:
                ckpt.save(step, state, data_iter, {**meta, "step": step}, metrics=eval_metrics)
            if preempted and not is_last:
                log.warning("preempted: checkpoint saved at step %d, exiting", step)
                stopped_early = True
                break
        if pending is not None:
            consume(*pending)
    finally:
        ckpt.close()
        writer.close()
        preempt.restore()
        if pbar is not None:
            pbar.close()
    if not stopped_early and is_main:
        log.info("done: %d steps, final loss logged in %s", n_steps, workdir / "metrics.jsonl")
    return state


__all__ = ["NonFiniteError", "build_loss", "build_model", "build_train_data", "init_pretrained",
           "make_overlay_image_fn", "resolve", "sample_batch", "total_steps", "train_and_evaluate"]
