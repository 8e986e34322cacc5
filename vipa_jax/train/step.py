"""Pure train/eval steps: ``train_step(state, batch, rng) -> (state, metrics)``.

The model is any Flax linen module with VIPA's call signature
``model.apply(variables, image, input_ids, attention_mask, train=..., rngs={'gumbel','dropout'})``
returning a dict with ``logits``, ``cls_relevance`` and ``tau``. An optional ``batch_stats``
collection (BatchNorm) is mutable in training and read-only in evaluation.

RNG: ``rng`` is the run's base key; the step uses ``fold_in(rng, state.step)`` (and
``fold_in(., i)`` for micro-batch ``i``), so a resumed run sees exactly the same randomness.

Gradient accumulation (``grad_accum_steps = k``): the global batch is split into k micro-batches
(micro-batch ``i`` = rows ``i, i+k, i+2k, ...``, which keeps every micro-batch evenly sharded over
'data'), gradients are accumulated in float32 inside one ``lax.scan`` and one optimizer update is
applied. Each micro-batch is weighted by its share of valid examples (``batch['valid']``), which
is exact when the loss is a mean over valid examples. BatchNorm statistics are updated
sequentially per micro-batch (so BN models are not bit-identical to one big batch).

Non-finite loss or gradient norm: params, batch_stats and optimizer state are kept unchanged
(the step counter still advances) and ``metrics['finite']`` is 0; the loop then stops or skips.

The step is built from two halves (`make_step_parts`: gradients; norm, guard and update):
`make_train_step` / `compose_step` jit them as one program, `SplitTrainStep`
(``train.split_update``) as two programs compiled at the same time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from vipa_jax.backend import parse_xla_options, target_backend
from vipa_jax.train.optim import global_norm, resolve_grad_norm

Batch = dict[str, jax.Array]
LossFn = Callable[[dict[str, jax.Array], Batch], tuple[jax.Array, dict[str, jax.Array]]]
MODEL_INPUTS = ("image", "input_ids", "attention_mask")


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes during training (a pure pytree: checkpointable as is)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def init_variables(model: Any, rng: jax.Array, batch: Batch) -> dict[str, Any]:
    """``model.init`` on a sample batch (train=False)."""
    k1, k2, k3 = jax.random.split(rng, 3)
    return model.init({"params": k1, "gumbel": k2, "dropout": k3},
                      *(batch[k] for k in MODEL_INPUTS), train=False)


def create_train_state(model: Any, tx: optax.GradientTransformation, rng: jax.Array,
                       batch: Batch) -> TrainState:
    """Fresh state (jit it with ``out_shardings`` to create it sharded)."""
    variables = flax.core.unfreeze(init_variables(model, rng, batch))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))


def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    v = {"params": params}
    if jax.tree.leaves(batch_stats):
        v["batch_stats"] = batch_stats
    return v


def _to_f32(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def forward(model: Any, params: Any, batch_stats: Any, batch: Batch, rng: jax.Array | None,
            train: bool) -> tuple[dict[str, jax.Array], Any]:
    """Model outputs (floats cast to f32) and the (possibly updated) batch_stats."""
    inputs = [batch[k] for k in MODEL_INPUTS]
    variables = _variables(params, batch_stats)
    if not train:
        return _to_f32(model.apply(variables, *inputs, train=False)), batch_stats
    g, d = jax.random.split(rng)
    has_bs = "batch_stats" in variables
    out = model.apply(variables, *inputs, train=True, rngs={"gumbel": g, "dropout": d},
                      mutable=["batch_stats"] if has_bs else False)
    if has_bs:
        out, updates = out
        batch_stats = updates["batch_stats"]
    return _to_f32(out), batch_stats


def _split_micro(batch: Batch, k: int) -> Batch:
    """(B, ...) -> (k, B/k, ...) with micro-batch i = rows i, i+k, ... (keeps 'data' sharding)."""
    def one(x: jax.Array) -> jax.Array:
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} not divisible by grad_accum_steps={k}")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    return jax.tree.map(one, batch)


class Grads(NamedTuple):
    """What `StepParts.grads` hands to `StepParts.apply` (float32 loss, the params' dtypes)."""

    loss: jax.Array
    aux: dict[str, jax.Array]
    grads: Any
    batch_stats: Any


class StepParts(NamedTuple):
    """The train step's two halves (`make_step_parts`): ``grads(state, batch, rng) -> Grads``
    (forward, backward and the accumulation over micro-batches) and ``apply(state, grads) ->
    (state, metrics)`` (the gradient norm, the finite guard and the optimizer's update)."""

    grads: Callable[[TrainState, Batch, jax.Array], Grads]
    apply: Callable[[TrainState, Grads], tuple[TrainState, dict[str, jax.Array]]]


def make_step_parts(
    model: Any,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    trainable: Any,
    grad_accum_steps: int = 1,
    micro_batch_sharding: Any = None,
    finite_guard: str = "auto",
    grad_norm: str = "auto",
) -> StepParts:
    """The train step in two pure halves (`make_train_step` / `compose_step` make them one
    program; `SplitTrainStep` compiles them as two). ``trainable``: pytree of python bools
    (False = frozen, grads zeroed).

    ``micro_batch_sharding`` (e.g. the batch NamedSharding) constrains each micro-batch.

    A non-finite loss or gradient norm skips the update (the step still counts), either way
    ``finite_guard`` says: 'cond' (one `lax.cond` over the whole state), 'select' (a
    `jnp.where` per state leaf) or 'auto' ('cond' on a CPU default backend, else 'select').
    XLA:CPU runs every per-leaf select as its own op: on the demo model (~1400 state leaves) the
    optimizer with the selects took 75 ms per step alone, 29 ms with the cond. On a GPU a
    conditional makes the host wait for its predicate (the end of the backward) before it can
    enqueue the optimizer, while XLA:GPU fuses each leaf's select into its AdamW update kernel
    (H200, paper model, batch 16: 869 such kernels, 2.84 ms of a 122.9 ms step, the whole
    optimizer update).

    ``grad_norm``: how the gradient norm (logged, and the guard's test) is summed,
    `optim.global_norm`'s `impl`.
    """
    k = int(grad_accum_steps)
    if k < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {k}")
    if finite_guard not in ("auto", "cond", "select"):
        raise ValueError(
            f"finite_guard must be 'auto', 'cond' or 'select', got {finite_guard!r}")
    if finite_guard == "auto":
        finite_guard = "cond" if target_backend() == "cpu" else "select"
    grad_norm = resolve_grad_norm(grad_norm)  # chosen here, like the guard, not when traced

    def micro_grads(params: Any, batch_stats: Any, mb: Batch, rng: jax.Array):
        def lf(p):
            out, new_bs = forward(model, p, batch_stats, mb, rng, train=True)
            loss, parts = loss_fn(out, mb)
            aux = {**{f"loss/{n}": v for n, v in parts.items()},
                   "tau": jnp.asarray(out.get("tau", jnp.nan), jnp.float32).mean()}
            return loss.astype(jnp.float32), (aux, new_bs)

        (loss, (aux, new_bs)), grads = jax.value_and_grad(lf, has_aux=True)(params)
        grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
        return loss, aux, grads, new_bs

    # named so that the split step's programs are jit_train_step_grads / _apply (XLA's logs)
    def train_step_grads(state: TrainState, batch: Batch, rng: jax.Array) -> Grads:
        step_rng = jax.random.fold_in(rng, state.step)
        if k == 1:
            return Grads(*micro_grads(state.params, state.batch_stats, batch, step_rng))
        micro = _split_micro(batch, k)
        if "valid" in batch:
            v = micro["valid"].astype(jnp.float32).sum(axis=1)
            weights = v / jnp.maximum(v.sum(), 1.0)
        else:
            weights = jnp.full((k,), 1.0 / k, jnp.float32)

        def body(carry, xs):
            g_acc, bs, loss_acc, aux_acc = carry
            mb, w, i = xs
            if micro_batch_sharding is not None:
                mb = jax.lax.with_sharding_constraint(mb, micro_batch_sharding)
            loss, aux, g, bs = micro_grads(state.params, bs, mb,
                                           jax.random.fold_in(step_rng, i))
            g_acc = jax.tree.map(lambda a, b: a + w * b.astype(jnp.float32), g_acc, g)
            aux_acc = jax.tree.map(lambda a, b: a + w * b, aux_acc, aux)
            return (g_acc, bs, loss_acc + w * loss, aux_acc), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        mb0 = jax.tree.map(lambda x: x[0], micro)
        aux_shape = jax.eval_shape(
            lambda: micro_grads(state.params, state.batch_stats, mb0, step_rng)[1])
        aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
        init = (zeros, state.batch_stats, jnp.zeros((), jnp.float32), aux0)
        (grads, new_bs, loss, aux), _ = jax.lax.scan(
            body, init, (micro, weights, jnp.arange(k)))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        return Grads(loss, aux, grads, new_bs)

    def train_step_apply(state: TrainState, g: Grads,
                         ) -> tuple[TrainState, dict[str, jax.Array]]:
        norm = global_norm(g.grads, grad_norm)
        finite = jnp.isfinite(g.loss) & jnp.isfinite(norm)

        def update(s: TrainState) -> TrainState:
            updates, new_opt = tx.update(g.grads, s.opt_state, s.params)
            return s.replace(step=s.step + 1, params=optax.apply_updates(s.params, updates),
                             batch_stats=g.batch_stats, opt_state=new_opt)

        def skip(s: TrainState) -> TrainState:
            return s.replace(step=s.step + 1)

        if finite_guard == "cond":
            new_state = jax.lax.cond(finite, update, skip, state)
        else:
            new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o),
                                     update(state), skip(state))
        metrics = {"loss": g.loss, "grad_norm": norm, "lr": schedule(state.step),
                   "finite": finite.astype(jnp.float32), **g.aux}
        return new_state, metrics

    return StepParts(train_step_grads, train_step_apply)


def make_train_step(*args: Any, **kwargs: Any,
                    ) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
    """The pure one-program step, ``compose_step(make_step_parts(...))``, with the same
    arguments: ``train_step(state, batch, rng) -> (state, metrics)``."""
    return compose_step(make_step_parts(*args, **kwargs))


def compose_step(parts: StepParts,
                 ) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
    """The one-program train step of `parts`: ``apply(state, grads(state, batch, rng))``."""
    def train_step(state: TrainState, batch: Batch, rng: jax.Array):
        return parts.apply(state, parts.grads(state, batch, rng))

    return train_step


def step_compiler_options(config: Any) -> dict[str, Any] | None:
    """The train step's XLA options, `backend.parse_xla_options` of ``config.train.xla_options``
    (None when there are none: XLA's defaults)."""
    return parse_xla_options(config.train.get("xla_options", "")) or None


def jit_train_step(step_fn: Callable, state_sharding: Any, batch_sharding: Any,
                   rng_sharding: Any, compiler_options: dict[str, Any] | None = None,
                   ) -> Callable:
    """``jax.jit`` with explicit in/out shardings and the state donated; `compiler_options`:
    XLA options for this program (`step_compiler_options`)."""
    return jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding, rng_sharding),
                   out_shardings=(state_sharding, rng_sharding), donate_argnums=(0,),
                   compiler_options=compiler_options or None)


class SplitTrainStep:
    """The train step as two jitted programs, `StepParts.grads` and `StepParts.apply` (the
    gradient norm, finite guard and optimizer update), compiled at the same time on two
    threads (on the first call, or by `compile`): ``train.split_update``. The same function
    and shardings as `jit_train_step`'s one program, with the state donated to the update;
    one more launch per step, and no fusion across the two. XLA's compile time grows faster
    than the program, so the halves compile sooner even one after the other, and at once the
    step takes its gradients' compile: the paper model's bfloat16 step for an H200 without a
    GPU (cuDNN attention, cuBLAS GEMMs, stacked Swin blocks, batch 16, 2 cores) in 69 s
    (gradients 69, update 20) against 86 s, for 0.8% more kernel I/O and 266 more launches
    (benchmarks/README.md, "Compile time"). Call it as the jitted step:
    ``state, metrics = step(state, batch, rng)``."""

    def __init__(self, parts: StepParts, state_sharding: Any = None, batch_sharding: Any = None,
                 rng_sharding: Any = None, compiler_options: dict[str, Any] | None = None,
                 ) -> None:
        """`parts` jitted with these shardings (all None: JAX's defaults, one device), the
        state donated to the update, `compiler_options` for both programs."""
        self.parts = parts
        opts = {"compiler_options": compiler_options or None}
        grads_kw: dict[str, Any] = dict(opts)
        apply_kw: dict[str, Any] = dict(opts, donate_argnums=(0,))
        if state_sharding is not None:
            grads_sh = Grads(loss=rng_sharding, aux=rng_sharding, grads=state_sharding.params,
                             batch_stats=state_sharding.batch_stats)
            grads_kw.update(in_shardings=(state_sharding, batch_sharding, rng_sharding),
                            out_shardings=grads_sh)
            apply_kw.update(in_shardings=(state_sharding, grads_sh),
                            out_shardings=(state_sharding, rng_sharding))
        self.grads_fn = jax.jit(parts.grads, **grads_kw)
        self.apply_fn = jax.jit(parts.apply, **apply_kw)
        self.compiled: tuple[Any, Any] | None = None
        self.compile_s: dict[str, float] = {}

    def lower(self, state: Any, batch: Any, rng: Any) -> tuple[Any, Any]:
        """Both programs lowered for these (concrete or abstract) arguments."""
        grads = jax.eval_shape(self.grads_fn, state, batch, rng)
        return self.grads_fn.lower(state, batch, rng), self.apply_fn.lower(state, grads)

    def compile(self, state: Any, batch: Any, rng: Any) -> tuple[Any, Any]:
        """Lower both programs and compile them (`compile_lowered`) -> (grads, apply)."""
        return self.compile_lowered(self.lower(state, batch, rng))

    def compile_lowered(self, lowered: tuple[Any, Any]) -> tuple[Any, Any]:
        """Compile the two lowered programs on two threads (XLA releases the GIL), keep them
        for the calls, and their compile times in `compile_s` -> (grads, apply) compiled."""
        import time
        from concurrent.futures import ThreadPoolExecutor

        def one(name_low: tuple[str, Any]) -> Any:
            t0 = time.perf_counter()
            out = name_low[1].compile()
            self.compile_s[name_low[0]] = time.perf_counter() - t0
            return out

        with ThreadPoolExecutor(2, thread_name_prefix="compile") as pool:
            self.compiled = tuple(pool.map(one, zip(("grads", "apply"), lowered, strict=True)))
        return self.compiled

    def __call__(self, state: TrainState, batch: Batch, rng: jax.Array,
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
        if self.compiled is None:
            self.compile(state, batch, rng)
        grads_exe, apply_exe = self.compiled
        return apply_exe(state, grads_exe(state, batch, rng))


def make_predict_fn(model: Any) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """Pure eval forward ``(state, batch) -> outputs`` (train=False, batch_stats read-only)."""
    def predict(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        return forward(model, state.params, state.batch_stats, batch, None, train=False)[0]
    return predict
