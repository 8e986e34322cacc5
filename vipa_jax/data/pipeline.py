"""grain input pipeline: record -> RGB image -> resize -> ImageNet normalisation -> tokens -> batch.

Batches are dicts of numpy arrays (B = per-host batch = global batch // shard_count)::

    image           float32 (B, H, W, 3)  bilinear-resized, (x/255 - mean) / std (ImageNet)
    mask            uint8   (B, H, W)     {0, 1}, nearest-resized to the network size
    input_ids       int32   (B, L)        from the tokenizer (L = its max_length)
    attention_mask  int32   (B, L)
    valid           bool    (B,)          False for eval padding and skipped (bad) records
    index           int32   (B,)          dataset record index (-1 for padding); use
                                          ``dataset[index].height/width`` and
                                          ``dataset.original_mask(index)`` for the
                                          ``original`` evaluation protocol

Training (:func:`make_train_iterator`): the global stream is epoch after epoch of a permutation
of the dataset's *objects*; each object appears once per epoch with one sentence drawn
uniformly. The permutation depends only on ``(seed, epoch)`` and the sentence only on
``(seed, epoch, object)``, so the stream is reproducible and independent of the number of
hosts: host ``h`` of ``P`` takes global positions ``h, h + P, ...``, so the union of the hosts'
batches at step ``s`` is exactly global positions ``[s*G, (s+1)*G)``. Batches may straddle
an epoch boundary (nothing is dropped). The iterator is a grain ``DatasetIterator``:
``get_state()``/``set_state()`` and ``grain.checkpoint.CheckpointSave/Restore`` (orbax)
round-trip it, and a restored iterator continues with exactly the batches it would have seen.

Evaluation (:func:`make_eval_batches`): every record exactly once in order; the last global
batch is padded (``valid=False``, ``index=-1``) so every host gets the same number of batches.

Bad records: a missing or corrupt image raises :class:`~vipa_jax.data.refer.DataError` naming
the file and the record, or with ``on_error='skip'`` yields a ``valid=False`` example (zeros),
logs a warning and counts it (``loader.skipped``). Readers already reject/skip empty masks.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
import PIL.Image

from vipa_jax.data.refer import DataError, RefDataset, check_on_error

log = logging.getLogger(__name__)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
Tokenizer = Callable[[list[str]], Mapping[str, np.ndarray]]
_ENDLESS_EPOCHS = 10**9


def _hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``480`` or ``(480, 480)`` -> (height, width)."""
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def preprocess_image(image: np.ndarray, image_size: int | Sequence[int]) -> np.ndarray:
    """uint8 RGB (h, w, 3) -> float32 (H, W, 3): bilinear resize, ImageNet normalisation."""
    h, w = _hw(image_size)
    im = PIL.Image.fromarray(image).resize((w, h), PIL.Image.Resampling.BILINEAR)
    x = np.asarray(im, np.float32) / 255.0
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def resize_mask(mask: np.ndarray, image_size: int | Sequence[int]) -> np.ndarray:
    """uint8 {0, 1} (h, w) -> uint8 (H, W) with nearest-neighbour resampling."""
    h, w = _hw(image_size)
    im = PIL.Image.fromarray(mask.astype(np.uint8)).resize((w, h), PIL.Image.Resampling.NEAREST)
    return np.asarray(im, np.uint8)


PADDING_SENTENCE = "a"  # text of the all-zero examples that fill the last eval batch


class TrainOrder:
    """Random-access global training stream of record indices (see the module docstring)."""

    def __init__(self, objects: Sequence[Sequence[int]], seed: int, num_epochs: int | None):
        if not objects:
            raise ValueError("the training dataset has no objects")
        self.objects = tuple(tuple(o) for o in objects)
        self.seed = int(seed)
        self.num_epochs = num_epochs

    def __len__(self) -> int:
        return len(self.objects) * (self.num_epochs or _ENDLESS_EPOCHS)

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a few epochs' permutations, tied to self
    def permutation(self, epoch: int) -> np.ndarray:
        """Object order of ``epoch`` (depends only on seed and epoch)."""
        return np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.objects))

    def sentence_choice(self, epoch: int, obj: int) -> int:
        """Which sentence of object ``obj`` is used in ``epoch``."""
        n = len(self.objects[obj])
        return int(np.random.default_rng([self.seed, 1, epoch, obj]).integers(n))

    def __getitem__(self, i: int) -> int:
        epoch, pos = divmod(int(i), len(self.objects))
        obj = int(self.permutation(epoch)[pos])
        return self.objects[obj][self.sentence_choice(epoch, obj)]

    def __repr__(self) -> str:
        return (
            f"TrainOrder(num_objects={len(self.objects)}, num_records="
            f"{sum(map(len, self.objects))}, seed={self.seed}, num_epochs={self.num_epochs})"
        )


class EvalOrder:
    """Record indices 0..n-1 followed by -1 padding up to a multiple of the global batch."""

    def __init__(self, num_records: int, global_batch_size: int):
        self.num_records = int(num_records)
        self.total = -(-self.num_records // global_batch_size) * global_batch_size

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, i: int) -> int:
        return int(i) if int(i) < self.num_records else -1

    def __repr__(self) -> str:
        return f"EvalOrder(num_records={self.num_records}, total={self.total})"


class LoadExample:
    """grain map: record index -> example dict (padding/skipped records get ``valid=False``)."""

    def __init__(
        self,
        dataset: RefDataset,
        tokenizer: Tokenizer,
        image_size: int | Sequence[int],
        on_error: str = "raise",
    ):
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.image_size = _hw(image_size)
        self.on_error = check_on_error(on_error)
        self.skipped = 0

    def _tokens(self, sentence: str) -> dict[str, np.ndarray]:
        """Tokenises one sentence into int32 (L,) ids and attention mask."""
        out = self.tokenizer([sentence])
        return {
            "input_ids": np.asarray(out["input_ids"], np.int32)[0],
            "attention_mask": np.asarray(out["attention_mask"], np.int32)[0],
        }

    @functools.cached_property
    def _padding_token_arrays(self) -> dict[str, np.ndarray]:
        # a real (ignored) sentence: empty text is an error for the tokenizer; tokenized once
        return self._tokens(PADDING_SENTENCE)

    def _padding_tokens(self) -> dict[str, np.ndarray]:
        """Token arrays (copies) for padding examples."""
        return {k: v.copy() for k, v in self._padding_token_arrays.items()}

    def _invalid(self, index: int) -> dict[str, Any]:
        """An all-zero example that metrics and losses ignore."""
        h, w = self.image_size
        return {
            "image": np.zeros((h, w, 3), np.float32),
            "mask": np.zeros((h, w), np.uint8),
            **self._padding_tokens(),
            "valid": np.bool_(False),
            "index": np.int32(index),
        }

    def __call__(self, index: int) -> dict[str, Any]:
        if index < 0:
            return self._invalid(-1)
        record = self.dataset[index]
        try:
            image = self.dataset.load_image(index)
            mask = self.dataset.load_mask(index)
        except DataError as e:
            if self.on_error == "raise":
                raise
            self.skipped += 1
            log.warning("skipping bad record (%d so far in this process): %s", self.skipped, e)
            return self._invalid(index)
        return {
            "image": preprocess_image(image, self.image_size),
            "mask": resize_mask(mask, self.image_size),
            **self._tokens(record.sentence),
            "valid": np.bool_(True),
            "index": np.int32(index),
        }

    def __repr__(self) -> str:
        return f"LoadExample({self.dataset!r}, image_size={self.image_size})"


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """Defaults to this JAX process's index / count."""
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    return shard_index, shard_count


def _per_host(global_batch_size: int, shard_count: int) -> int:
    """Per-host batch size; the global batch must split evenly over hosts."""
    if global_batch_size <= 0 or global_batch_size % shard_count:
        raise ValueError(
            f"global batch {global_batch_size} must be a positive multiple of the "
            f"{shard_count} host(s)"
        )
    return global_batch_size // shard_count


def _iterate(ds: grain.MapDataset, num_workers: int, num_threads: int) -> grain.DatasetIterator:
    """MapDataset -> (optionally multi-process) prefetching iterator."""
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2, num_threads))
    )
    if num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it_ds)


def make_train_iterator(
    dataset: RefDataset,
    tokenizer: Tokenizer,
    *,
    global_batch_size: int,
    image_size: int | Sequence[int],
    seed: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_workers: int = 0,
    num_threads: int = 2,
    num_epochs: int | None = None,
    on_error: str | None = None,
) -> grain.DatasetIterator:
    """Endless (or ``num_epochs``) shuffled training batches for this host; checkpointable."""
    shard_index, shard_count = _shard(shard_index, shard_count)
    per_host = _per_host(global_batch_size, shard_count)
    load = LoadExample(dataset, tokenizer, image_size, on_error or dataset.on_error)
    ds = grain.MapDataset.source(TrainOrder(dataset.objects, seed, num_epochs))
    ds = ds[shard_index::shard_count].map(load).batch(per_host, drop_remainder=True)
    return _iterate(ds, num_workers, num_threads)


def num_eval_batches(num_records: int, global_batch_size: int) -> int:
    """Number of (padded) eval batches every host yields."""
    return -(-num_records // global_batch_size)


def make_eval_batches(
    dataset: RefDataset,
    tokenizer: Tokenizer,
    *,
    global_batch_size: int,
    image_size: int | Sequence[int],
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_workers: int = 0,
    num_threads: int = 2,
    on_error: str | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Every record once, in order, last batch padded; :func:`num_eval_batches` per host."""
    shard_index, shard_count = _shard(shard_index, shard_count)
    per_host = _per_host(global_batch_size, shard_count)
    load = LoadExample(dataset, tokenizer, image_size, on_error or dataset.on_error)
    ds = grain.MapDataset.source(EvalOrder(len(dataset), global_batch_size))
    ds = ds[shard_index::shard_count].map(load).batch(per_host, drop_remainder=True)
    return _iterate(ds, num_workers, num_threads)


def load_dataset(data_config: Any, split: str) -> RefDataset:
    """Builds the dataset for ``split`` from ``config.data`` (``source`` picks the reader)."""
    source = data_config.source
    root = str(data_config.root)
    on_error = _get(data_config, "on_error", "raise")
    if source == "refer":
        from vipa_jax.data.refer import ReferDataset

        return ReferDataset(
            root, data_config.dataset, data_config.split_by, split, on_error=on_error
        )
    if source == "referit":
        from vipa_jax.data.referit import ReferItDataset

        return ReferItDataset(root, data_config.split_by, split, on_error=on_error)
    if source == "tfds":
        from vipa_jax.data.tfds_refcoco import TfdsRefCoco

        return TfdsRefCoco.from_names(
            data_config.dataset,
            data_config.split_by,
            split,
            data_dir=root or None,
            builder=_get(data_config, "tfds_builder", "ref_coco_bv"),
            on_error=on_error,
        )
    if source == "synthetic":
        from vipa_jax.data import synthetic
        from vipa_jax.data.refer import ReferDataset

        if not root:
            raise ValueError("config.data.root must name the synthetic dataset folder")
        if not synthetic.is_complete(root):
            log.info("generating the synthetic dataset into %s", root)
            synthetic.generate(
                root,
                num_images=_get(data_config, "synthetic_num_images", 1000),
                image_size=_get(data_config, "synthetic_image_size", 160),
                seed=_get(data_config, "synthetic_seed", 0),
            )
        return ReferDataset(
            root, synthetic.DATASET_NAME, synthetic.SPLIT_BY, split, on_error=on_error
        )
    raise ValueError(
        f"unknown config.data.source {source!r}; expected one of 'refer', 'referit', 'tfds', "
        "'synthetic'"
    )


def loader_options(data_config: Any) -> dict[str, int]:
    """``num_workers`` / ``num_threads`` of ``config.data`` (grain worker processes, read threads
    in each) as keyword arguments of `make_train_iterator`, `make_eval_batches` and the
    evaluator; an older config without them gets the iterators' defaults. 0 threads reads in
    the calling thread; a negative count is a ValueError naming the field."""
    opts = {"num_workers": int(_get(data_config, "num_workers", 0)),
            "num_threads": int(_get(data_config, "num_threads", 2))}
    for name, n in opts.items():
        if n < 0:
            raise ValueError(f"config.data.{name} must be >= 0, got {n}")
    return opts


def _get(cfg: Any, key: str, default: Any) -> Any:
    """``cfg.key`` if the config has it, else ``default``."""
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


__all__ = [
    "EvalOrder", "IMAGENET_MEAN", "IMAGENET_STD", "LoadExample", "TrainOrder", "load_dataset",
    "loader_options",
    "make_eval_batches", "make_train_iterator", "num_eval_batches", "preprocess_image",
    "resize_mask",
]
