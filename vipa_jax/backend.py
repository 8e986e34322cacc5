"""The backend that the `auto` settings choose for: the default backend, or one named for
compiling ahead of time for a device this machine lacks (`benchmarks.gpu_aot`).

Every `auto` switch that picks a form per backend asks `target_backend()`: the attention softmax
and q/k/v projection (`models.layers`), the decoder's 3×3 convolution (`models.decoder`) and
the train step's non-finite guard (`train.step`); Swin's relative-position bias keeps its
gradient apart (`models.swin`) on every backend but the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

_TARGETS: list[str] = []


def target_backend() -> str:
    """'cpu', 'gpu', 'tpu', ...: the innermost `compiling_for` backend, else JAX's default."""
    return _TARGETS[-1] if _TARGETS else jax.default_backend()


@contextlib.contextmanager
def compiling_for(backend: str) -> Iterator[None]:
    """Within this block, `auto` settings choose as they would on `backend`: build the train
    step (its guard is chosen then), trace and lower inside it."""
    _TARGETS.append(backend)
    try:
        yield
    finally:
        _TARGETS.pop()
