"""The backend that the `auto` settings choose for: the default backend, or one named for
compiling ahead of time for a device this machine lacks (`benchmarks.gpu_aot`).

Every `auto` switch that picks a form per backend asks `target_backend()`: the attention softmax
and q/k/v projection (`models.layers`), the decoder's 3×3 convolution (`models.decoder`) and
the train step's non-finite guard (`train.step`); Swin's relative-position bias keeps its
gradient apart (`models.swin`) on every backend but the CPU.

Also JAX's persistent compilation cache for the command-line tools (`enable_compilation_cache`),
and XLA options for one program (`parse_xla_options`: `train.xla_options`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
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


# Where train.py, eval.py, predict.py and demo.py keep compiled XLA programs (config key
# `compilation_cache_dir`; '' = off): a rerun or a resumed run loads its train step instead of
# compiling it again (the paper model's bfloat16 step: about 3 min on an H200's host).
DEFAULT_COMPILATION_CACHE_DIR = "~/.cache/vipa_jax/xla"


def enable_compilation_cache(path: str | None = DEFAULT_COMPILATION_CACHE_DIR) -> str | None:
    """Turn on JAX's persistent compilation cache in `path` (`~` expanded, created), unless a
    cache is set already (`JAX_COMPILATION_CACHE_DIR` or JAX's config: that one is kept);
    '' or None leaves it off. Call it before the first compile. -> the folder in use, or None."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if not path:
        return None
    folder = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        logging.warning("compilation cache off: cannot create %s (%s)", folder, e)
        return None
    jax.config.update("jax_compilation_cache_dir", folder)
    return folder


_XLA_OPTION = re.compile(r"xla_[a-z0-9_]+")
XlaOptionValue = bool | int | float | str


def parse_xla_options(text: str, field: str = "train.xla_options") -> dict[str, XlaOptionValue]:
    """XLA options for one program, written as in `XLA_FLAGS`, -> `jax.jit(compiler_options=)`.

    ``"--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=0"`` ->
    ``{"xla_gpu_enable_triton_gemm": False, "xla_gpu_autotune_level": 0}``: ``[--]name=value``
    items separated by whitespace or ``;`` (for places that cannot hold a space, such as one of
    `device_suite.sh`'s space-separated ``AB_VARIANTS``: ``...xla_options=--a=1;--b=2``);
    true/false become bools, numbers ints or floats, anything else stays a string. Unlike
    `XLA_FLAGS`, which holds for every program of the process, these hold for the one program
    compiled with them, and they are part of its compilation-cache key. A malformed item is a
    ValueError naming `field`; XLA rejects an unknown option name when it compiles.
    """
    out: dict[str, XlaOptionValue] = {}
    for item in str(text or "").replace(";", " ").split():
        name, eq, value = item.removeprefix("--").partition("=")
        if not eq or not _XLA_OPTION.fullmatch(name) or not value:
            raise ValueError(f"{field}: {item!r} is not an XLA option `[--]xla_name=value`, "
                             "e.g. '--xla_gpu_enable_triton_gemm=false'")
        out[name] = _option_value(value)
    return out


def _option_value(text: str) -> XlaOptionValue:
    """'true'/'false' -> bool, '3' -> 3, '0.5' -> 0.5, anything else the string itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
