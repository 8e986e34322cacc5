"""Data: refer-layout / ReferIt / TFDS readers, the synthetic generator and the grain pipeline."""

from vipa_jax.data.pipeline import (
    LoadExample,
    TrainOrder,
    load_dataset,
    make_eval_batches,
    make_train_iterator,
    num_eval_batches,
    preprocess_image,
    resize_mask,
)
from vipa_jax.data.refer import DataError, Expression, RefDataset, ReferDataset, decode_segmentation
from vipa_jax.data.referit import ReferItDataset

__all__ = [
    "DataError", "Expression", "LoadExample", "RefDataset", "ReferDataset", "ReferItDataset",
    "TrainOrder", "decode_segmentation", "load_dataset", "make_eval_batches",
    "make_train_iterator", "num_eval_batches", "preprocess_image", "resize_mask",
]
