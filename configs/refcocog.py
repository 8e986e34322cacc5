"""The paper's VIPA on refcocog (see configs/refcoco.py)."""

import ml_collections

from configs import refcoco


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return refcoco.get_config("refcocog")
