"""Logical-axis sharding rules: names from parameter paths, rules -> PartitionSpecs."""

from typing import Any

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs.synthetic import get_config
from vipa_jax.train import loop
from vipa_jax.train import sharding as shd
from vipa_jax.train import step as step_lib
from vipa_jax.train.optim import path_str


def _vipa_params() -> Any:
    c = get_config("test")
    model = loop.build_model(c)
    return jax.eval_shape(lambda: step_lib.init_variables(model, jax.random.PRNGKey(0),
                                                          loop.sample_batch(c)))["params"]


def _specs(params: Any, data: int, model: int, rules: tuple[str, ...]) -> dict[str, Any]:
    """What state_shardings computes on a (data, model) mesh, without needing the devices."""
    parsed, sizes = shd.parse_axis_rules(rules), {"data": data, "model": model}
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        p = path_str(path)
        out[p] = shd.logical_to_spec(shd.logical_axes(p, x.ndim), x.shape, parsed, sizes)
    return out


def test_vipa_parameters_get_their_logical_axes() -> None:
    """Swin, BERT, fusion, VEG and decoder parameters are named by role, not by shape."""
    flat = {path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(_vipa_params())[0]}
    axes = {p: shd.logical_axes(p, v.ndim) for p, v in flat.items()}
    swin = "encoder/backbone/layers_0/blocks_0"
    assert axes[f"{swin}/attn/query/kernel"] == ("embed", "heads")
    assert axes[f"{swin}/attn/out/kernel"] == ("heads", "embed")
    assert axes[f"{swin}/mlp/fc1/kernel"] == ("embed", "mlp")
    assert axes[f"{swin}/mlp/fc2/kernel"] == ("mlp", "embed")
    assert axes[f"{swin}/relative_position_bias_table"] == ("table", "heads")
    bert = "encoder/text_encoder"
    assert axes[f"{bert}/embeddings/word_embeddings/embedding"] == ("vocab", "embed")
    assert axes[f"{bert}/embeddings/position_embeddings/embedding"] == ("table", "embed")
    layer = f"{bert}/encoder/layer/0"
    assert axes[f"{layer}/attention/self/key/kernel"] == ("embed", "heads")
    assert axes[f"{layer}/attention/output/dense/kernel"] == ("heads", "embed")
    assert axes[f"{layer}/intermediate/dense/kernel"] == ("embed", "mlp")
    assert axes[f"{layer}/output/dense/kernel"] == ("mlp", "embed")
    assert axes[f"{layer}/output/LayerNorm/scale"] == ("norm",)
    assert axes["decoder/head/kernel"] == (None, None, "conv_in", "conv_out")
    assert axes["veg/aggregate/kernel"] == ("embed", "hidden")  # any other Dense
    assert axes["veg/select_global/log_tau"] == ()
    # every leaf has exactly one name (or None) per dimension
    assert all(len(a) == flat[p].ndim for p, a in axes.items())


def test_rules_to_partition_specs() -> None:
    """FSDP: one dim over 'data' (first divisible); tensor parallel rules add 'model'; leaves
    too small, 1-D norms/biases and non-divisible dims stay replicated."""
    assert shd.logical_to_spec(("embed", "mlp"), (64, 128), [("embed", "data"), ("mlp", "data")],
                               {"data": 8, "model": 1}) == P("data")
    assert shd.logical_to_spec(("embed", "mlp"), (60, 128), [("embed", "data"), ("mlp", "data")],
                               {"data": 8, "model": 1}) == P(None, "data")
    tp = [("embed", "data"), ("mlp", "model")]
    assert shd.logical_to_spec(("mlp", "embed"), (128, 64), tp,
                               {"data": 4, "model": 2}) == P("model", "data")
    assert shd.logical_to_spec(("norm",), (64,), shd.parse_axis_rules(shd.FSDP_RULES),
                               {"data": 8, "model": 1}) == P()
    # a mesh axis of size 1 never appears in a spec
    assert shd.logical_to_spec(("embed", "mlp"), (64, 128), tp, {"data": 1, "model": 1}) == P()

    specs = _specs(_vipa_params(), 4, 2, shd.FSDP_RULES)
    k = "encoder/text_encoder/encoder/layer/0/intermediate/dense/kernel"  # (32, 64)
    assert specs[k] == P("data")
    assert specs["encoder/backbone/layers_0/blocks_0/norm1/scale"] == P()
    assert not any("model" in s for s in specs.values())
    tp_specs = _specs(_vipa_params(), 4, 2, ("embed=data", "mlp=model", "heads=model"))
    assert tp_specs[k] == P("data", "model")
    q = "encoder/text_encoder/encoder/layer/0/attention/self/query/kernel"
    assert tp_specs[q] == P("data", "model")


def test_state_shardings_on_real_mesh_and_param_axes() -> None:
    """state_shardings on a real 1-device mesh; config.sharding.param_axes overrides names;
    bad rules are refused with the entry named."""
    mesh = shd.make_mesh((1, 1), jax.devices()[:1])
    tree = {"new_head": {"kernel": jax.ShapeDtypeStruct((64, 64), np.float32)}}
    sh = shd.state_shardings(tree, mesh, fsdp=True, fsdp_min_size=0)
    assert sh["new_head"]["kernel"].spec == P()  # data axis of size 1
    assert shd.logical_axes("new_head/kernel", 2, shd.parse_param_axes(["new_head/=,vocab"])) == (
        None, "vocab")
    with pytest.raises(ValueError, match="not a mesh axis"):
        shd.parse_axis_rules(["embed=tensor"])
    with pytest.raises(ValueError, match="expected 'name=value'"):
        shd.parse_axis_rules(["embed"])
    with pytest.raises(ValueError, match="bad regex"):
        shd.parse_param_axes(["(=embed"])


def test_stacked_block_params_keep_their_names() -> None:
    """model.swin.stacked_params: a `block_pairs` leaf is ('layers', then one block's axes);
    FSDP shards one block dimension and never the stacked one; the optimizer gives the stacked
    leaves the labels of the blocks they hold."""
    from vipa_jax.train import optim

    c = get_config("test")
    c.model.swin.update(dict(depths=(1, 1, 4, 1), scan_blocks=True, stacked_params=True))
    model = loop.build_model(c)
    params = jax.eval_shape(lambda: step_lib.init_variables(
        model, jax.random.PRNGKey(0), loop.sample_batch(c)))["params"]
    pairs = "encoder/backbone/layers_2/block_pairs/blocks_1"
    flat = {path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert flat[f"{pairs}/attn/query/kernel"].shape == (2, 64, 64)
    axes = {p: shd.logical_axes(p, v.ndim) for p, v in flat.items()}
    assert axes[f"{pairs}/attn/query/kernel"] == ("layers", "embed", "heads")
    assert axes[f"{pairs}/mlp/fc2/kernel"] == ("layers", "mlp", "embed")
    assert axes[f"{pairs}/relative_position_bias_table"] == ("layers", "table", "heads")
    assert axes[f"{pairs}/norm1/scale"] == ("layers", "norm")
    assert all(len(a) == flat[p].ndim for p, a in axes.items())
    specs = _specs(params, 4, 1, shd.FSDP_RULES)
    assert specs[f"{pairs}/attn/query/kernel"] == P(None, "data")
    assert specs[f"{pairs}/mlp/fc2/kernel"] == P(None, "data")
    labels = {optim.path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(
        optim.param_labels(params, c.optim))[0]}
    assert labels[f"{pairs}/attn/query/kernel"] == "decay"
    assert labels[f"{pairs}/attn/query/bias"] == "no_decay"
    assert labels[f"{pairs}/norm2/scale"] == "no_decay"
    assert labels[f"{pairs}/relative_position_bias_table"] == "no_decay"
