"""Inference bundles: export a training checkpoint to a small, optimizer-free folder and load it.

A bundle folder holds::

    config.json             the full ml_collections config (JSON)
    params.safetensors      float32 tensors named by '/'-joined paths: 'params/...' and
                            'batch_stats/...' (decoder BatchNorm statistics, when present)
    vocab.txt               the WordPiece vocabulary
    tokenizer_config.json   {"do_lower_case": bool, "max_length": int}

``python -m vipa_jax.export --checkpoint WORKDIR --out BUNDLE_DIR [--step N] [--vocab FILE]``
writes one from a training workdir (``WORKDIR/checkpoints/<step>/{state,meta}``), from its
``checkpoints`` folder or from one step folder. Only ``params`` and ``batch_stats`` are read
from the orbax ``state`` item (a partial restore: the optimizer state is never loaded).

:func:`load_bundle` needs neither orbax nor the optimizer; :func:`load_any` accepts a bundle or a
training checkpoint (detected from the folder's contents) and is what ``eval.py`` and
``predict.py`` use.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from vipa_jax.data.tokenizer import VOCAB_FILE, Tokenizer, vocab_for
from vipa_jax.defaults import with_defaults
from vipa_jax.models.vipa import VIPA, build_model, init_variables

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
TOKENIZER_FILE = "tokenizer_config.json"
BUNDLE_FILES = (CONFIG_FILE, PARAMS_FILE, VOCAB_FILE)
COLLECTIONS = ("params", "batch_stats")
FORMAT_VERSION = "1"


@dataclasses.dataclass
class Loaded:
    """A model ready for inference, plus where it came from."""

    config: ml_collections.ConfigDict
    model: VIPA
    variables: dict[str, Any]
    tokenizer: Tokenizer
    source: str  # 'bundle' | 'checkpoint'
    path: str
    step: int | None


# --- flattening ----------------------------------------------------------------------------
def flatten_variables(variables: Any) -> dict[str, np.ndarray]:
    """{'params': {...}, 'batch_stats': {...}} -> {'params/a/b': float32 array} (host NumPy)."""
    out: dict[str, np.ndarray] = {}
    for col in COLLECTIONS:
        tree = variables.get(col) if hasattr(variables, "get") else None
        if not tree:
            continue
        flat = traverse_util.flatten_dict(jax.device_get(tree), sep="/")
        for k, v in flat.items():
            a = np.asarray(v)
            out[f"{col}/{k}"] = a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a
    return out


def unflatten_variables(
    flat: dict[str, np.ndarray], expected: dict[str, Any], what: str
) -> dict[str, Any]:
    """Check ``flat`` against the abstract tree ``expected`` (names, shapes) and nest it.

    Raises ValueError listing missing/unexpected keys and every shape mismatch by name.
    """
    want = flatten_variables_abstract(expected)
    missing = sorted(set(want) - set(flat))
    extra = sorted(set(flat) - set(want))
    bad = [
        f"{k}: file {tuple(flat[k].shape)} vs config {want[k]}"
        for k in sorted(set(want) & set(flat))
        if tuple(flat[k].shape) != want[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {missing[:10]}")
    if extra:
        problems.append(f"unexpected {len(extra)} tensor(s): {extra[:10]}")
    if bad:
        problems.append(f"{len(bad)} shape mismatch(es): {bad[:10]}")
    if problems:
        raise ValueError(f"{what} does not match the model built from its config: "
                         + "; ".join(problems))
    nested: dict[str, Any] = {}
    for col in COLLECTIONS:
        sub = {tuple(k.split("/")[1:]): v for k, v in flat.items() if k.split("/")[0] == col}
        if sub:
            nested[col] = traverse_util.unflatten_dict(sub)
    return nested


def flatten_variables_abstract(tree: Any) -> dict[str, tuple[int, ...]]:
    """Shapes of the ``params``/``batch_stats`` leaves of a (possibly abstract) variables tree."""
    out: dict[str, tuple[int, ...]] = {}
    for col in COLLECTIONS:
        sub = tree.get(col) if hasattr(tree, "get") else None
        if sub:
            for k, v in traverse_util.flatten_dict(sub, sep="/").items():
                out[f"{col}/{k}"] = tuple(v.shape)
    return out


def abstract_variables(model: VIPA, config: Any) -> Any:
    """ShapeDtypeStructs of the variables the model builds from ``config.model``."""
    rng = jax.random.PRNGKey(0)
    return jax.eval_shape(
        lambda: init_variables(model, rng, config.model.image_size, config.model.max_tokens)
    )


# --- configs -------------------------------------------------------------------------------
def config_from_dict(d: dict[str, Any]) -> ml_collections.ConfigDict:
    """A JSON-decoded config dict -> ConfigDict, over today's defaults (older saves load)."""
    return with_defaults(d)


def config_to_json(config: Any) -> str:
    """The full config as indented JSON."""
    if isinstance(config, ml_collections.ConfigDict | ml_collections.FrozenConfigDict):
        return config.to_json_best_effort(indent=2)
    return json.dumps(config, indent=2, default=str)


# --- bundles -------------------------------------------------------------------------------
def is_bundle(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder with a bundle's config.json and params.safetensors."""
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / PARAMS_FILE).is_file()


def save_bundle(
    out_dir: str | os.PathLike[str],
    config: Any,
    variables: Any,
    vocab_path: str | os.PathLike[str],
    *,
    lowercase: bool = True,
    step: int | None = None,
) -> Path:
    """Write config.json, params.safetensors (float32), vocab.txt and tokenizer_config.json."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not os.path.isfile(vocab_path):
        raise FileNotFoundError(f"vocab file not found: {vocab_path}")
    flat = flatten_variables(variables)
    if not any(k.startswith("params/") for k in flat):
        raise ValueError("variables have no 'params' collection to export")
    meta = {"format": "vipa_jax.bundle", "version": FORMAT_VERSION,
            "step": "" if step is None else str(int(step))}
    # np.array(order="C"), not ascontiguousarray: the latter turns 0-d scalars into (1,).
    save_file({k: np.array(v, order="C") for k, v in flat.items()}, str(out / PARAMS_FILE),
              metadata=meta)
    (out / CONFIG_FILE).write_text(config_to_json(config) + "\n")
    if Path(vocab_path).resolve() != (out / VOCAB_FILE).resolve():
        shutil.copyfile(vocab_path, out / VOCAB_FILE)
    max_length = int(config.model.max_tokens)
    (out / TOKENIZER_FILE).write_text(
        json.dumps({"do_lower_case": bool(lowercase), "max_length": max_length}, indent=2) + "\n"
    )
    return out


def load_bundle(
    path: str | os.PathLike[str],
) -> tuple[ml_collections.ConfigDict, VIPA, dict[str, Any], Tokenizer]:
    """(config, model, variables, tokenizer) from a bundle folder (no orbax, no optimizer)."""
    loaded = _load_bundle(path)
    return loaded.config, loaded.model, loaded.variables, loaded.tokenizer


def _load_bundle(path: str | os.PathLike[str]) -> Loaded:
    """:func:`load_bundle` returning a :class:`Loaded` (with the exported step)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"bundle folder not found: {p}")
    missing = [f for f in BUNDLE_FILES if not (p / f).is_file()]
    if missing:
        raise FileNotFoundError(f"bundle {p} is missing {missing} (expected {list(BUNDLE_FILES)})")
    try:
        config = config_from_dict(json.loads((p / CONFIG_FILE).read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p / CONFIG_FILE}: invalid JSON ({e})") from e
    if "model" not in config:
        raise ValueError(f"{p / CONFIG_FILE}: no 'model' section")
    model = build_model(config.model)
    flat: dict[str, np.ndarray] = {}
    with safe_open(str(p / PARAMS_FILE), framework="numpy") as f:
        meta = f.metadata() or {}
        for k in f.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
            flat[k] = f.get_tensor(k)
    variables = unflatten_variables(flat, abstract_variables(model, config), str(p / PARAMS_FILE))
    tok_cfg: dict[str, Any] = {}
    if (p / TOKENIZER_FILE).is_file():
        tok_cfg = json.loads((p / TOKENIZER_FILE).read_text())
    tokenizer = Tokenizer(p / VOCAB_FILE, max_length=int(config.model.max_tokens),
                          lowercase=bool(tok_cfg.get("do_lower_case", True)))
    step = int(meta["step"]) if meta.get("step") else None
    return Loaded(config, model, jax.device_put(variables), tokenizer, "bundle", str(p), step)


# --- training checkpoints ------------------------------------------------------------------
def _step_dirs(ckpt_dir: Path) -> dict[int, Path]:
    """Committed orbax step folders (numeric names with a ``state`` item) by step."""
    if not ckpt_dir.is_dir():
        return {}
    return {int(d.name): d for d in ckpt_dir.iterdir()
            if d.is_dir() and d.name.isdigit() and (d / "state").is_dir()}


def find_step_dir(path: str | os.PathLike[str], step: int | None = None) -> Path:
    """A step folder from a workdir, its ``checkpoints`` folder, or a step folder itself."""
    p = Path(path).absolute()  # orbax refuses relative paths
    if (p / "state").is_dir():
        if step is not None and p.name.isdigit() and int(p.name) != step:
            raise ValueError(f"{p} is the checkpoint of step {p.name}, not {step}")
        return p
    for d in (p / "checkpoints", p):
        steps = _step_dirs(d)
        if steps:
            if step is None:
                return steps[max(steps)]
            if step not in steps:
                raise FileNotFoundError(f"no checkpoint of step {step} in {d} "
                                        f"(have {sorted(steps)})")
            return steps[step]
    raise FileNotFoundError(
        f"{p} is neither an inference bundle ({CONFIG_FILE} + {PARAMS_FILE}) nor a training "
        "workdir / checkpoints folder / step folder with an orbax 'state' item"
    )


def read_checkpoint_meta(step_dir: Path) -> dict[str, Any]:
    """The JSON ``meta`` item of a step folder ({} when absent)."""
    import orbax.checkpoint as ocp

    meta_dir = step_dir / "meta"
    if not meta_dir.is_dir():
        return {}
    return dict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(meta_dir) or {})


def restore_variables(step_dir: Path) -> dict[str, Any]:
    """Partial orbax restore of ``params`` (+ ``batch_stats``) of the ``state`` item, as NumPy."""
    import orbax.checkpoint as ocp

    state_dir = step_dir / "state"
    handler = ocp.PyTreeCheckpointHandler()
    tree = handler.metadata(state_dir).tree
    if "params" not in tree:
        raise ValueError(f"{state_dir}: the saved state has no 'params' (keys {list(tree)})")
    cols = [c for c in COLLECTIONS if tree.get(c)]
    want = {c: jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree[c]) for c in cols}
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), want)
    with ocp.Checkpointer(handler) as ckptr:
        restored = ckptr.restore(
            state_dir, args=ocp.args.PyTreeRestore(item=want, restore_args=args,
                                                   partial_restore=True))
    return {c: restored[c] for c in cols}


def _workdir_config(step_dir: Path, meta: dict[str, Any]) -> ml_collections.ConfigDict:
    """The run's config: the checkpoint's meta, else ``<workdir>/config.json``."""
    if meta.get("config"):
        return config_from_dict(meta["config"])
    for cand in (step_dir.parent.parent / CONFIG_FILE, step_dir.parent / CONFIG_FILE):
        if cand.is_file():
            return config_from_dict(json.loads(cand.read_text()))
    raise FileNotFoundError(f"no config in {step_dir / 'meta'} nor a config.json next to the "
                            "checkpoints folder")


def load_checkpoint(
    path: str | os.PathLike[str], step: int | None = None,
    vocab: str | os.PathLike[str] | None = None,
) -> Loaded:
    """Model, variables (params + batch_stats) and tokenizer from a training checkpoint."""
    step_dir = find_step_dir(path, step)
    meta = read_checkpoint_meta(step_dir)
    config = _workdir_config(step_dir, meta)
    model = build_model(config.model)
    flat = flatten_variables(restore_variables(step_dir))
    variables = unflatten_variables(flat, abstract_variables(model, config), str(step_dir))
    vocab_path = vocab_for(config, vocab)
    tokenizer = Tokenizer(vocab_path, max_length=int(config.model.max_tokens))
    s = int(meta["step"]) if "step" in meta else (
        int(step_dir.name) if step_dir.name.isdigit() else None)
    return Loaded(config, model, jax.device_put(variables), tokenizer, "checkpoint",
                  str(step_dir), s)


def load_any(
    path: str | os.PathLike[str], step: int | None = None,
    vocab: str | os.PathLike[str] | None = None,
) -> Loaded:
    """A bundle (config.json + params.safetensors) or a training checkpoint, detected."""
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint path not found: {path}")
    if is_bundle(path):
        if step is not None:
            log.warning("--step is ignored for an inference bundle (%s)", path)
        loaded = _load_bundle(path)
        if vocab:
            loaded.tokenizer = Tokenizer(vocab, max_length=int(loaded.config.model.max_tokens),
                                         lowercase=loaded.tokenizer.lowercase)
        return loaded
    return load_checkpoint(path, step, vocab)


def export(
    checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str],
    step: int | None = None, vocab: str | os.PathLike[str] | None = None,
) -> Path:
    """Training checkpoint (or another bundle) -> inference bundle in ``out_dir``."""
    loaded = load_any(checkpoint, step, vocab)
    return save_bundle(out_dir, loaded.config, loaded.variables, loaded.tokenizer.vocab_path,
                       lowercase=loaded.tokenizer.lowercase, step=loaded.step)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: ``python -m vipa_jax.export --checkpoint DIR --out DIR``."""
    import argparse

    p = argparse.ArgumentParser(description="Export a VIPA training checkpoint to a bundle.")
    p.add_argument("--checkpoint", required=True,
                   help="training workdir, its checkpoints folder, a step folder, or a bundle")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--vocab", default=None, help="vocab.txt (default: from the config)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    out = export(a.checkpoint, a.out, a.step, a.vocab)
    print(f"wrote inference bundle {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
