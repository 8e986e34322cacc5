"""The paper's VIPA on RefCOCO (unc): Swin-B w12 (ImageNet-22K) + BERT-base, 480×480, 21 tokens.

`--config configs/refcoco.py:refcoco+` / `:refcocog` select the other COCO-based datasets
(refcocog uses the umd split). Point `--config.data.root` at the refer layout and
`--config.train.init_swin` / `--config.train.init_bert` at the pretrained weights.
"""

import ml_collections

from configs.base import get_base_config

_SPLITS = {
    "refcoco": ("unc", ("val", "testA", "testB")),
    "refcoco+": ("unc", ("val", "testA", "testB")),
    "refcocog": ("umd", ("val", "test")),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name = arg or "refcoco"
    if name not in _SPLITS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(_SPLITS)}")
    c = get_base_config()
    c.data.source = "refer"
    c.data.dataset = name
    c.data.split_by, c.data.eval_splits = _SPLITS[name]
    return c
