"""Tiny stand-in for VIPA (same call signature/outputs), loss and data, for training-loop tests.

Also a config file: ``python train.py --config tests/_standin.py --workdir DIR`` trains it
(``tests/`` must be on PYTHONPATH so the ``_standin:...`` factories import).
"""

from __future__ import annotations

import time
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs.base import get_base_config


class _Embeddings(nn.Module):
    vocab: int
    dim: int

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        x = nn.Embed(self.vocab, self.dim, name="word_embeddings")(ids)
        return nn.LayerNorm(name="LayerNorm")(x)


class _TextEncoder(nn.Module):
    vocab: int
    dim: int
    dtype: Any
    dropout: float = 0.1

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
        x = _Embeddings(self.vocab, self.dim, name="embeddings")(ids)
        x = nn.Dense(self.dim, dtype=self.dtype, name="encoder_layer_0_dense")(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        m = mask[..., None].astype(x.dtype)
        return (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)  # (B, dim)


class _Backbone(nn.Module):
    dim: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.dim, (3, 3), strides=2, dtype=self.dtype, name="patch_embed")(x)
        x = nn.LayerNorm(name="norm1", dtype=self.dtype)(x)
        table = self.param("relative_position_bias_table", nn.initializers.normal(0.02),
                           (9, self.dim))
        return nn.gelu(x + table.mean(0).astype(x.dtype))


class StandIn(nn.Module):
    """Convs + embedding (+ optional BatchNorm / noise) with VIPA's interface."""

    vocab: int = 50
    dim: int = 8
    use_bn: bool = True
    noise: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                 train: bool = False) -> dict[str, jax.Array]:
        B, H, W, _ = image.shape
        v = _Backbone(self.dim, self.dtype, name="backbone")(image.astype(self.dtype))
        t = _TextEncoder(self.vocab, self.dim, self.dtype, 0.1 if self.noise else 0.0,
                         name="text_encoder")(
            input_ids, attention_mask, train)
        tau = self.param("tau", nn.initializers.ones, ())
        f = v * t[:, None, None, :].astype(v.dtype)
        rel = f.sum(-1) / tau  # (B, h, w)
        if train and self.noise:
            rel = rel + 0.01 * jax.random.gumbel(self.make_rng("gumbel"), rel.shape)
        y = nn.Conv(self.dim, (3, 3), dtype=self.dtype, name="decoder_conv")(f)
        if self.use_bn:
            y = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="decoder_bn")(y)
        y = nn.relu(y)
        y = nn.Conv(1, (1, 1), dtype=self.dtype, name="decoder_head")(y)[..., 0]
        logits = jax.image.resize(y.astype(jnp.float32), (B, H, W), "bilinear")
        return {"logits": logits, "cls_relevance": rel.astype(jnp.float32), "tau": tau}


def build_model(model_cfg: Any) -> StandIn:
    """Stand-in factory (``config.model.factory = '_standin:build_model'``)."""
    return StandIn(vocab=model_cfg.get("vocab", 50), dim=model_cfg.get("dim", 8),
                   use_bn=model_cfg.get("use_bn", True), noise=model_cfg.get("noise", True),
                   dtype=jnp.dtype(model_cfg.dtype))


def loss_fn(outputs: dict[str, jax.Array], batch: dict[str, jax.Array],
            loss_cfg: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example BCE on the mask + BCE of the relevance map, averaged over valid examples."""
    mask = batch["mask"].astype(jnp.float32)
    bce = jnp.mean(jnp.maximum(outputs["logits"], 0) - outputs["logits"] * mask
                   + jnp.log1p(jnp.exp(-jnp.abs(outputs["logits"]))), axis=(1, 2))
    rel = outputs["cls_relevance"]
    small = jax.image.resize(mask, rel.shape, "nearest")
    con = jnp.mean(jnp.maximum(rel, 0) - rel * small + jnp.log1p(jnp.exp(-jnp.abs(rel))),
                   axis=(1, 2))
    valid = batch.get("valid", jnp.ones(mask.shape[:1], bool)).astype(jnp.float32)
    denom = jnp.maximum(valid.sum(), 1.0)
    bce, con = (bce * valid).sum() / denom, (con * valid).sum() / denom
    return bce + 0.5 * con, {"bce": bce, "contrastive": con}


def make_batch(n: int, size: int = 16, length: int = 6, vocab: int = 50, seed: int = 0,
               offset: int = 0) -> dict[str, np.ndarray]:
    """Deterministic random batch: squares as masks, ids encode the square's corner."""
    rng = np.random.default_rng(seed)
    out = {k: [] for k in ("image", "mask", "input_ids", "attention_mask", "valid")}
    for i in range(n):
        r = np.random.default_rng([seed, offset + i])
        m = np.zeros((size, size), np.float32)
        y, x = r.integers(0, size // 2, 2)
        m[y:y + size // 2, x:x + size // 2] = 1
        img = r.normal(size=(size, size, 3)).astype(np.float32) + m[..., None]
        ids = r.integers(1, vocab, length).astype(np.int32)
        am = np.ones(length, np.int32)
        am[r.integers(2, length + 1):] = 0
        for k, val in zip(out, (img, m, ids * am, am, True), strict=True):
            out[k].append(val)
    del rng
    return {k: np.stack(v) for k, v in out.items()}


class _Example(grain.transforms.Map):
    def __init__(self, size: int, length: int, vocab: int, seed: int, delay_s: float = 0.0):
        self.size, self.length, self.vocab, self.seed = size, length, vocab, seed
        self.delay_s = delay_s

    def map(self, i: int) -> dict[str, np.ndarray]:
        if self.delay_s:
            time.sleep(self.delay_s)
        b = make_batch(1, self.size, self.length, self.vocab, self.seed, offset=int(i))
        return {k: v[0] for k, v in b.items()}


class _Faults:
    """Batch ``nan_at`` gets a NaN image; reading batch ``crash_at`` raises (simulated crash)."""

    def __init__(self, nan_at: int, crash_at: int):
        self.nan_at, self.crash_at = nan_at, crash_at

    def __call__(self, index: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if index == self.crash_at:
            raise SimulatedCrash(f"simulated crash reading batch {index}")
        if index == self.nan_at:
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        return batch


class SimulatedCrash(RuntimeError):
    """Raised by the stand-in data when ``config.data.crash_at`` is reached."""


def make_train_data(config: Any, process_index: int, process_count: int, per_host_batch: int):
    """Checkpointable grain iterator over a tiny random dataset, sharded per host."""
    n = int(config.data.get("num_examples", 64))
    size, length = config.model.image_size, config.model.max_tokens
    ds = grain.MapDataset.range(n)[process_index::process_count]
    ds = ds.shuffle(seed=config.seed).repeat(None)
    ds = ds.map(_Example(size, length, config.model.get("vocab", 50), config.seed,
                         config.data.get("delay_s", 0.0)))
    ds = ds.batch(per_host_batch, drop_remainder=True)
    nan_at, crash_at = config.data.get("nan_at", -1), config.data.get("crash_at", -1)
    if nan_at >= 0 or crash_at >= 0:
        ds = ds.map_with_index(_Faults(nan_at, crash_at))
    it = iter(ds.to_iter_dataset())
    steps_per_epoch = n // (per_host_batch * process_count)
    return it, steps_per_epoch


def get_config() -> ml_collections.ConfigDict:
    """Tiny stand-in training config (CPU, seconds)."""
    c = get_base_config()
    c.model.image_size = 16
    c.model.max_tokens = 6
    c.model.factory = "_standin:build_model"
    c.model.vocab = 50
    c.model.dim = 8
    c.model.use_bn = True
    c.model.noise = True
    c.data.factory = "_standin:make_train_data"
    c.data.num_examples = 64
    c.data.delay_s = 0.0  # per example (slows training down for kill tests)
    c.data.nan_at = -1  # batch index with a NaN image
    c.data.crash_at = -1  # batch index whose read raises SimulatedCrash
    c.loss.factory = "_standin:loss_fn"
    c.optim.lr = 3e-3
    c.train.batch_size = 8
    c.train.total_steps = 12
    c.train.log_every = 2
    c.train.eval_every = 0
    c.train.image_every = 0
    c.train.progress = False
    c.ckpt.every_steps = 4
    c.ckpt.keep = 2
    c.ckpt.async_save = False
    c.sharding.fsdp_min_size = 0
    return c


def loop_config(total_steps: int, every_steps: int, **data: Any) -> ml_collections.ConfigDict:
    """get_config() for a short loop run on whatever devices exist; ``data`` sets data fields."""
    cfg = get_config()
    cfg.train.total_steps = total_steps
    cfg.ckpt.every_steps = every_steps
    cfg.sharding.mesh_shape = (1, 1) if jax.device_count() == 1 else (-1, 1)
    for k, v in data.items():
        cfg.data[k] = v
    return cfg


def run_steps(mesh: Any, fsdp: bool, steps: int, batch: int = 8, grad_accum: int = 1,
              use_bn: bool = True, noise: bool = True, tx: Any = None,
              rules: tuple[str, ...] = (), split: bool = False,
              nan_at: int = -1) -> tuple[list, Any]:
    """Train the stand-in for ``steps`` on fixed batches on ``mesh``; (losses, final state).
    ``rules``: logical-axis rules (config.sharding.logical_axis_rules); ``split``: as two
    programs (`step.SplitTrainStep`); ``nan_at``: the step whose batch has a NaN image."""
    import functools

    from vipa_jax.train import optim, step
    from vipa_jax.train import sharding as shd

    cfg = get_config()
    model = StandIn(use_bn=use_bn, noise=noise)
    sample = make_batch(1)
    abstract_params = jax.eval_shape(
        lambda: step.init_variables(model, jax.random.PRNGKey(0), sample))["params"]
    if tx is None:
        tx, sched = optim.make_optimizer(cfg.optim, abstract_params, 100)
    else:
        sched = lambda s: jnp.zeros(())  # noqa: E731
    create = functools.partial(step.create_train_state, model, tx)
    abstract = jax.eval_shape(lambda: create(jax.random.PRNGKey(0), sample))
    st_sh = shd.state_shardings(abstract, mesh, fsdp, fsdp_min_size=0, rules=rules)
    state = jax.jit(lambda: create(jax.random.PRNGKey(0), sample), out_shardings=st_sh)()
    bsh, rep = shd.batch_sharding(mesh), shd.replicated(mesh)
    parts = step.make_step_parts(model, loss_fn, tx, sched,
                                 optim.trainable_mask(abstract_params, cfg.optim),
                                 grad_accum_steps=grad_accum, micro_batch_sharding=bsh)
    fn = (step.SplitTrainStep(parts, st_sh, bsh, rep) if split
          else step.jit_train_step(step.compose_step(parts), st_sh, bsh, rep))
    rng = jax.device_put(jax.random.PRNGKey(1), rep)
    losses = []
    for s in range(steps):
        b = make_batch(batch, seed=1, offset=s * batch)
        b["valid"][::3] = False
        if s == nan_at:
            b["image"][:] = np.nan
        state, m = fn(state, {k: jax.device_put(v, bsh) for k, v in b.items()}, rng)
        losses.append(float(m["loss"]))
    return losses, state
