"""The paper's VIPA on ReferIt (refclef, saiapr_tc-12 images; berkeley split train/val/test)."""

import ml_collections

from configs.base import get_base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = get_base_config()
    c.data.source = "referit"
    c.data.dataset = "refclef"
    c.data.split_by = "berkeley"
    c.data.eval_splits = ("val", "test")
    return c
