"""Load PyTorch Swin checkpoints into `vipa_jax.models.swin.SwinTransformer` params.

Supported sources (format detected from the key names):
- official Microsoft `.pth` (`swin_base_patch4_window12_384_22k.pth`, optionally wrapped in
  `{'model': sd}` / `{'state_dict': sd}`, optionally prefixed `backbone.` as in mmseg/LAVT):
  fused `attn.qkv` is split into query/key/value; `relative_position_index`, `attn_mask`,
  `head.*` and the classifier `norm.*` are skipped; `norm0..3` load when present.
- HF `SwinModel` / `SwinBackbone` / `SwinFor*` state dicts, `.safetensors` files or folders,
  with either the on-disk names (`attention.self.query`, `intermediate.dense`) or the in-memory
  transformers-5 names (`attention.q_proj`, `mlp.fc1`); an optional `swin.` prefix is dropped;
  `hidden_states_norms.stage{i+1}` -> `norm_{i}`.

Linear (out, in) -> Dense kernel (in, out); Conv2d (O, I, kh, kw) -> (kh, kw, I, O).
Relative-position tables keep their trained size: build the model with the checkpoint's window.
Per-stage output norms `norm_{i}` absent from the checkpoint keep their init and are returned
in `LoadReport.missing` (and logged). torch is imported only to read `.pth`/`.pt`/`.bin`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vipa_jax.models.layers import resize_bilinear_align_corners
from vipa_jax.models.swin import (
    SwinTransformer,
    has_block_pairs,
    stack_block_pairs,
    unstack_block_pairs,
)

logger = logging.getLogger(__name__)

Params = dict[str, Any]
Path = tuple[str, ...]
# May be absent from a checkpoint: the stage output norms (classification checkpoints) and the
# `ape` table (a checkpoint trained with ape=False loaded into a model with ape=True starts it
# from init).
_OPTIONAL_RE = re.compile(r"^(norm_\d+|absolute_pos_embed)/")
_NORM_RE = re.compile(r"^norm_\d+/")


@dataclasses.dataclass
class LoadReport:
    """What a load did: target params filled, kept from init (missing), and source keys skipped."""

    loaded: list[str]
    missing: list[str]
    skipped: list[str]
    source_format: str


# ------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------


def _to_numpy(value: Any) -> np.ndarray:
    """torch.Tensor / numpy / jax array -> float32-or-int numpy array."""
    if hasattr(value, "detach"):  # torch.Tensor (bf16 has no numpy dtype: go through float32)
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    arr = np.asarray(value)
    return arr


def _unwrap(sd: Mapping[str, Any]) -> Mapping[str, Any]:
    """Strip `{'model': sd}` / `{'state_dict': sd}` wrappers."""
    for key in ("model", "state_dict"):
        if key in sd and isinstance(sd[key], Mapping):
            return sd[key]
    return sd


def _load_torch(path: str) -> Mapping[str, Any]:
    """Read a torch pickle checkpoint (torch is an optional extra, imported here only)."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs torch (pip install 'vipa_jax[torch]')") from e
    return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Checkpoint file / HF folder / in-memory state dict -> {key: numpy array}."""
    if isinstance(source, Mapping):
        sd = _unwrap(source)
    else:
        path = os.fspath(source)
        if os.path.isdir(path):
            index = os.path.join(path, "model.safetensors.index.json")
            single = os.path.join(path, "model.safetensors")
            if os.path.exists(single):
                return read_state_dict(single)
            if os.path.exists(index):
                with open(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                out: dict[str, np.ndarray] = {}
                for shard in shards:
                    out.update(read_state_dict(os.path.join(path, shard)))
                return out
            if os.path.exists(os.path.join(path, "pytorch_model.bin")):
                return read_state_dict(os.path.join(path, "pytorch_model.bin"))
            raise FileNotFoundError(
                f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
            )
        if not os.path.exists(path):
            raise FileNotFoundError(f"Swin checkpoint not found: {path}")
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            sd = load_file(path)
        elif path.endswith((".pth", ".pt", ".bin", ".ckpt")):
            sd = _unwrap(_load_torch(path))
        else:
            raise ValueError(f"{path}: unknown checkpoint extension (.pth/.pt/.bin/.safetensors)")
    return {str(k): _to_numpy(v) for k, v in sd.items()}


# ------------------------------------------------------------------------------------------
# Key conversion
# ------------------------------------------------------------------------------------------


def _linear(w: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> Dense kernel (in, out)."""
    return np.ascontiguousarray(w.T)


def _conv(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight (O, I, kh, kw) -> Flax Conv kernel (kh, kw, I, O)."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _param(module: str, suffix: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """(module path, torch suffix weight|bias, value) -> (flax path, converted value)."""
    if suffix == "bias":
        return f"{module}/bias", value
    if value.ndim == 4:
        return f"{module}/kernel", _conv(value)
    if value.ndim == 2:
        return f"{module}/kernel", _linear(value)
    return f"{module}/scale", value  # LayerNorm weight


# (regex on the normalised key, flax module path template); groups: stage, block, torch suffix.
_BLOCK = r"layers\.(\d+)\.blocks\.(\d+)\."
_OFFICIAL_RULES: list[tuple[str, str]] = [
    (r"patch_embed\.proj\.(weight|bias)", "patch_embed/proj"),
    (r"patch_embed\.norm\.(weight|bias)", "patch_embed/norm"),
    (_BLOCK + r"norm1\.(weight|bias)", "layers_{0}/blocks_{1}/norm1"),
    (_BLOCK + r"norm2\.(weight|bias)", "layers_{0}/blocks_{1}/norm2"),
    (_BLOCK + r"attn\.proj\.(weight|bias)", "layers_{0}/blocks_{1}/attn/out"),
    (_BLOCK + r"mlp\.fc1\.(weight|bias)", "layers_{0}/blocks_{1}/mlp/fc1"),
    (_BLOCK + r"mlp\.fc2\.(weight|bias)", "layers_{0}/blocks_{1}/mlp/fc2"),
    (r"layers\.(\d+)\.downsample\.norm\.(weight|bias)", "downsample_{0}/norm"),
    (r"layers\.(\d+)\.downsample\.reduction\.(weight)", "downsample_{0}/reduction"),
    (r"norm(\d+)\.(weight|bias)", "norm_{0}"),
]
_OFFICIAL_SKIP = re.compile(
    r"(.*relative_position_index|.*attn_mask|head\..*|norm\.(weight|bias))$"
)

_HF_BLOCK = r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
_HF_RULES: list[tuple[str, str]] = [
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", "patch_embed/proj"),
    (r"embeddings\.norm\.(weight|bias)", "patch_embed/norm"),
    (_HF_BLOCK + r"layernorm_before\.(weight|bias)", "layers_{0}/blocks_{1}/norm1"),
    (_HF_BLOCK + r"layernorm_after\.(weight|bias)", "layers_{0}/blocks_{1}/norm2"),
    (_HF_BLOCK + r"attention\.(?:self\.query|q_proj)\.(weight|bias)",
     "layers_{0}/blocks_{1}/attn/query"),
    (_HF_BLOCK + r"attention\.(?:self\.key|k_proj)\.(weight|bias)",
     "layers_{0}/blocks_{1}/attn/key"),
    (_HF_BLOCK + r"attention\.(?:self\.value|v_proj)\.(weight|bias)",
     "layers_{0}/blocks_{1}/attn/value"),
    (_HF_BLOCK + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)",
     "layers_{0}/blocks_{1}/attn/out"),
    (_HF_BLOCK + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)",
     "layers_{0}/blocks_{1}/mlp/fc1"),
    (_HF_BLOCK + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", "layers_{0}/blocks_{1}/mlp/fc2"),
    (r"encoder\.layers\.(\d+)\.downsample\.norm\.(weight|bias)", "downsample_{0}/norm"),
    (r"encoder\.layers\.(\d+)\.downsample\.reduction\.(weight)", "downsample_{0}/reduction"),
    (r"hidden_states_norms\.stage(\d+)\.(weight|bias)", "norm_{0}"),
]
_HF_SKIP = re.compile(
    r"(.*relative_position_index|layernorm\.(weight|bias)|pooler\..*|classifier\..*"
    r"|decoder\..*|embeddings\.mask_token|hidden_states_norms\.stem\..*)$"
)
_HF_TABLE = re.compile(
    _HF_BLOCK + r"attention\.(?:self|relative_position_bias)\.relative_position_bias_table$"
)
_OFFICIAL_TABLE = re.compile(_BLOCK + r"attn\.relative_position_bias_table$")
_OFFICIAL_QKV = re.compile(_BLOCK + r"attn\.qkv\.(weight|bias)$")


def detect_format(keys: list[str]) -> str:
    """'official' (Microsoft naming), 'hf' (transformers naming) or 'vipa_jax' (our own
    '/'-joined param paths, written by :func:`save_swin_params`), from the key names."""
    if any(k.startswith("patch_embed/") for k in keys):
        return "vipa_jax"
    if any("patch_embed.proj" in k for k in keys):
        return "official"
    if any("embeddings.patch_embeddings" in k for k in keys):
        return "hf"
    raise ValueError(
        "not a Swin checkpoint: no 'patch_embed.proj.*' (official) or "
        f"'embeddings.patch_embeddings.*' (HF) key; first keys: {keys[:5]}"
    )


def _apply_rules(
    key: str, value: np.ndarray, rules: list[tuple[str, str]], *, shift_stage: bool = False
) -> tuple[str, np.ndarray] | None:
    """Match one key against a rule table -> (flax path, value) or None."""
    for pattern, template in rules:
        m = re.fullmatch(pattern, key)
        if m:
            *idx, suffix = m.groups()
            if shift_stage and template == "norm_{0}":  # HF stage1..4 -> norm_0..3
                idx = [str(int(idx[0]) - 1)]
            return _param(template.format(*idx), suffix, value)
    return None


def convert_official(sd: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Official Microsoft / mmseg state dict -> ({flax path: array}, skipped keys)."""
    out: dict[str, np.ndarray] = {}
    skipped: list[str] = []
    for raw_key, value in sd.items():
        key = raw_key.removeprefix("backbone.")
        if m := _OFFICIAL_QKV.fullmatch(key):
            i, j, suffix = m.groups()
            if value.shape[0] % 3:
                raise ValueError(f"{raw_key}: fused qkv has {value.shape[0]} rows, not 3·C")
            for name, part in zip(("query", "key", "value"), np.split(value, 3, axis=0),
                                  strict=True):
                path, arr = _param(f"layers_{i}/blocks_{j}/attn/{name}", suffix, part)
                out[path] = arr
        elif m := _OFFICIAL_TABLE.fullmatch(key):
            out[f"layers_{m[1]}/blocks_{m[2]}/relative_position_bias_table"] = value
        elif converted := _apply_rules(key, value, _OFFICIAL_RULES):
            out[converted[0]] = converted[1]
        elif _OFFICIAL_SKIP.fullmatch(key):
            skipped.append(raw_key)
        else:
            raise ValueError(f"unrecognised key in official Swin checkpoint: {raw_key!r}")
    return out, skipped


def convert_hf(sd: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """HF SwinModel / SwinBackbone state dict -> ({flax path: array}, skipped keys)."""
    out: dict[str, np.ndarray] = {}
    skipped: list[str] = []
    for raw_key, value in sd.items():
        key = raw_key.removeprefix("swin.")
        if key.startswith("embeddings.position_embeddings"):
            raise ValueError(f"{raw_key}: absolute position embeddings are not supported")
        if m := _HF_TABLE.fullmatch(key):
            out[f"layers_{m[1]}/blocks_{m[2]}/relative_position_bias_table"] = value
        elif converted := _apply_rules(key, value, _HF_RULES, shift_stage=True):
            out[converted[0]] = converted[1]
        elif _HF_SKIP.fullmatch(key):
            skipped.append(raw_key)
        else:
            raise ValueError(f"unrecognised key in HF Swin checkpoint: {raw_key!r}")
    return out, skipped


def convert_vipa_jax(sd: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Our own safetensors (keys are already flax paths) -> ({flax path: array}, [])."""
    return {k: np.asarray(v) for k, v in sd.items()}, []


def save_swin_params(params: Params, path: str | os.PathLike) -> str:
    """Write a Swin param tree as safetensors keyed by '/'-joined paths (atomic), loadable by
    :func:`load_swin_params` / ``train.init_swin``; stacked blocks are written one by one."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: Swin params are saved as .safetensors")
    flat = {k: np.ascontiguousarray(np.asarray(v, np.float32))
            for k, v in _flatten(unstack_block_pairs(params)).items()}  # blocks one by one
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(flat, tmp, metadata={"format": "vipa_jax-swin"})
    os.replace(tmp, path)
    return path


_CONVERTERS: dict[str, Callable[..., tuple[dict[str, np.ndarray], list[str]]]] = {
    "official": convert_official,
    "hf": convert_hf,
    "vipa_jax": convert_vipa_jax,
}


# ------------------------------------------------------------------------------------------
# Filling the params tree
# ------------------------------------------------------------------------------------------


def _shape_hint(path: str, expected: tuple[int, ...], actual: tuple[int, ...]) -> str:
    """Extra explanation for common mismatches."""
    if path.endswith("relative_position_bias_table") and len(actual) == 2:
        w_ckpt = (int(round(actual[0] ** 0.5)) + 1) // 2
        w_model = (int(round(expected[0] ** 0.5)) + 1) // 2
        return (f" (checkpoint window {w_ckpt}, model window {w_model}: build the model with "
                f"window_size={w_ckpt}; tables are not resized)")
    return ""


def _flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Nested params -> {'a/b/c': leaf}."""
    return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(dict(tree)).items()}


def _dummy_images() -> jax.Array:
    """Tiny (1, 32, 32, 3) input: param shapes do not depend on the image size."""
    return jnp.zeros((1, 32, 32, 3), jnp.float32)


def init_params(model: SwinTransformer, rng: jax.Array | int = 0) -> Params:
    """Random-init params of `model`."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    return jax.jit(model.init)(rng, _dummy_images())["params"]


def param_shapes(model: SwinTransformer) -> Params:
    """Params tree of jax.ShapeDtypeStruct (no compute)."""
    return jax.eval_shape(model.init, jax.random.key(0), _dummy_images())["params"]


def _layernorm_init(path: str, leaf: Any) -> jax.Array:
    """The value nn.LayerNorm initialises `path` to (scale ones, bias zeros)."""
    fill = jnp.ones if path.endswith("/scale") else jnp.zeros
    return fill(leaf.shape, leaf.dtype)


_APE_TABLE = "absolute_pos_embed/table"


def _match_ape_grid(converted: dict[str, Any], target: dict[str, Any], *, resize: bool
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """An `ape` table made on another patch grid (same width): the model resizes it at apply
    time anyway, so a model-only load keeps the checkpoint's grid, and a load into given params
    (e.g. train.init_swin) resizes it (bilinear, align_corners) to theirs."""
    if _APE_TABLE not in converted or _APE_TABLE not in target:
        return converted, target
    table = np.asarray(converted[_APE_TABLE])
    want = tuple(target[_APE_TABLE].shape)
    same_width = table.ndim == 4 and (table.shape[0], table.shape[3]) == (want[0], want[3])
    if not same_width or table.shape == want:
        return converted, target  # other mismatches are reported by the shape check
    if resize:
        table = np.asarray(resize_bilinear_align_corners(jnp.asarray(table), want[1:3],
                                                         axes=(1, 2)))
        return {**converted, _APE_TABLE: table}, target
    shape = jax.ShapeDtypeStruct(table.shape, target[_APE_TABLE].dtype)
    return converted, {**target, _APE_TABLE: shape}


def load_swin_params(
    source: str | os.PathLike | Mapping[str, Any],
    model: SwinTransformer | None,
    params: Params | None = None,
    *,
    strict: bool = True,
    rng: jax.Array | int = 0,
) -> tuple[Params, LoadReport]:
    """Checkpoint (official or HF) -> (params for `model`, LoadReport).

    `params` supplies the values of parameters the checkpoint lacks; by default missing stage
    output norms get the LayerNorm init (ones/zeros) and any other missing parameter a fresh
    init from `rng`. With `strict`, only the per-stage output norms and the `ape` table may be
    missing; any other missing parameter raises. Shapes are checked against
    `jax.eval_shape` of the model's init. A model (or `params`) with `stacked_params` gets the
    checkpoint's blocks stacked into its `block_pairs`.
    """
    sd = read_state_dict(source)
    fmt = detect_format(list(sd))
    converted, skipped = _CONVERTERS[fmt](sd)
    if model is None:  # the target tree is `params` itself (e.g. a subtree of a bigger model)
        if params is None:
            raise ValueError("load_swin_params needs a model or a params tree")
        shapes = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), params)
    else:
        shapes = param_shapes(model)
    # checkpoints hold blocks one by one: match them to the unrolled tree, stack at the end
    stacked = has_block_pairs(shapes)
    target = _flatten(unstack_block_pairs(shapes))
    if params is not None:
        given = _flatten(unstack_block_pairs(params))
        if sorted(given) != sorted(target) or any(
            tuple(given[p].shape) != tuple(target[p].shape) for p in target
        ):
            raise ValueError("`params` does not match the model's param tree / shapes")

    converted, target = _match_ape_grid(converted, target, resize=params is not None)
    errors = []
    unexpected = sorted(set(converted) - set(target))
    if unexpected:
        errors.append(f"checkpoint params with no place in the model (depths/stages differ?): "
                      f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for path in sorted(set(converted) & set(target)):
        expected, actual = tuple(target[path].shape), tuple(converted[path].shape)
        if expected != actual:
            errors.append(f"{path}: expected shape {expected}, checkpoint has {actual}"
                          + _shape_hint(path, expected, actual))
    missing = sorted(set(target) - set(converted))
    if strict:
        required = [p for p in missing if not _OPTIONAL_RE.match(p)]
        if required:
            errors.append(f"{len(required)} model params missing from the checkpoint: "
                          f"{required[:8]}{' ...' if len(required) > 8 else ''}")
    if errors:
        raise ValueError(f"cannot load Swin {fmt} checkpoint: " + "; ".join(errors))
    if missing:  # expected for the optional ones (stage norms, ape table): info, else warn
        level = logging.INFO if all(_OPTIONAL_RE.match(p) for p in missing) else logging.WARNING
        logger.log(level, "Swin checkpoint lacks %d params, kept from init: %s", len(missing),
                   missing)

    if params is not None:
        fallback = given
    elif all(_NORM_RE.match(p) for p in missing):
        fallback = {p: _layernorm_init(p, target[p]) for p in missing}
    else:
        fallback = _flatten(unstack_block_pairs(init_params(model, rng)))
    flat = {
        tuple(path.split("/")): (
            jnp.asarray(converted[path], dtype=target[path].dtype) if path in converted
            else fallback[path]
        )
        for path in target
    }
    new_params = flax.traverse_util.unflatten_dict(flat)
    if stacked:
        new_params = stack_block_pairs(new_params)
    report = LoadReport(loaded=sorted(converted), missing=missing, skipped=sorted(skipped),
                        source_format=fmt)
    return new_params, report
