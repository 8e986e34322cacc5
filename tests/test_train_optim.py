"""Optimizer labels, frozen/no-decay behaviour, schedule values, param summary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_base_config
from vipa_jax.train import optim

PARAMS = {
    "backbone": {
        "layers_0": {"blocks_0": {"attn": {
            "relative_position_bias_table": jnp.ones((9, 2)),
            "qkv": {"kernel": jnp.ones((4, 12)), "bias": jnp.ones((12,))},
        }, "norm1": {"scale": jnp.ones((4,)), "bias": jnp.ones((4,))}}},
        "absolute_pos_embed": jnp.ones((1, 4)),
    },
    "text_encoder": {
        "embeddings": {"word_embeddings": {"embedding": jnp.ones((10, 4))},
                       "LayerNorm": {"scale": jnp.ones((4,)), "bias": jnp.ones((4,))}},
        "encoder": {"layer": {"0": {"attention": {"output": {
            "dense": {"kernel": jnp.ones((4, 4))},
            "LayerNorm": {"scale": jnp.ones((4,))}}}}}},
    },
    "decoder": {"BatchNorm_0": {"scale": jnp.ones((4,))},
                "conv": {"kernel": jnp.ones((3, 3, 4, 1))},
                "attn_norm": {"scale": jnp.ones((4,))}},
}

EXPECTED = {
    "backbone/layers_0/blocks_0/attn/relative_position_bias_table": "no_decay",
    "backbone/layers_0/blocks_0/attn/qkv/kernel": "decay",
    "backbone/layers_0/blocks_0/attn/qkv/bias": "no_decay",
    "backbone/layers_0/blocks_0/norm1/scale": "no_decay",
    "backbone/layers_0/blocks_0/norm1/bias": "no_decay",
    "backbone/absolute_pos_embed": "no_decay",
    "text_encoder/embeddings/word_embeddings/embedding": "frozen",
    "text_encoder/embeddings/LayerNorm/scale": "frozen",
    "text_encoder/embeddings/LayerNorm/bias": "frozen",
    "text_encoder/encoder/layer/0/attention/output/dense/kernel": "decay",
    "text_encoder/encoder/layer/0/attention/output/LayerNorm/scale": "no_decay",
    "decoder/BatchNorm_0/scale": "no_decay",
    "decoder/conv/kernel": "decay",
    "decoder/attn_norm/scale": "no_decay",
}


def _flat(tree):
    return {optim.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_labels_match_rules():
    labels = _flat(optim.param_labels(PARAMS, get_base_config().optim))
    assert labels == EXPECTED


def test_freeze_off_and_custom_regexes():
    cfg = get_base_config().optim
    cfg.freeze_bert_embeddings = False
    cfg.no_decay_regexes = (r"bias$",)
    cfg.freeze_regexes = (r"^decoder/",)
    labels = _flat(optim.param_labels(PARAMS, cfg))
    assert labels["text_encoder/embeddings/word_embeddings/embedding"] == "decay"
    assert labels["backbone/layers_0/blocks_0/norm1/scale"] == "decay"
    assert labels["backbone/layers_0/blocks_0/norm1/bias"] == "no_decay"
    assert labels["decoder/conv/kernel"] == "frozen"


def test_zero_grad_update_frozen_and_decay():
    """Zero gradients: decay leaves move by -lr*wd*w, no-decay and frozen leaves stay put."""
    cfg = get_base_config().optim
    cfg.lr, cfg.weight_decay = 0.1, 0.5
    tx, _ = optim.make_optimizer(cfg, PARAMS, total_steps=100)
    st = tx.init(PARAMS)
    upd, _ = tx.update(jax.tree.map(jnp.zeros_like, PARAMS), st, PARAMS)
    for name, u in _flat(upd).items():
        want = -0.1 * 0.5 if EXPECTED[name] == "decay" else 0.0
        np.testing.assert_allclose(np.asarray(u), want, rtol=1e-6, err_msg=name)


def test_frozen_exact_zero_with_large_grads_and_clipping():
    cfg = get_base_config().optim
    cfg.clip_grad_norm = 1.0
    tx, _ = optim.make_optimizer(cfg, PARAMS, total_steps=10)
    st = tx.init(PARAMS)
    grads = jax.tree.map(lambda p: 1e6 * jnp.ones_like(p), PARAMS)
    for _ in range(3):
        upd, st = tx.update(grads, st, PARAMS)
        emb = _flat(upd)["text_encoder/embeddings/word_embeddings/embedding"]
        assert np.all(np.asarray(emb) == 0.0)
        assert np.all(np.asarray(_flat(upd)["decoder/conv/kernel"]) != 0.0)
    # no Adam moments for frozen leaves: state size = trainable param count (mu + nu)
    n_state = sum(x.size for x in jax.tree.leaves(st) if x.ndim > 0)
    n_trainable = sum(v.size for k, v in _flat(PARAMS).items() if EXPECTED[k] != "frozen")
    assert n_state == 2 * n_trainable


def test_clipping_excludes_frozen_grads():
    """Frozen grads are zeroed before clipping, so they do not shrink the trainable grads."""
    cfg = get_base_config().optim
    cfg.clip_grad_norm = 1.0
    labels = optim.param_labels(PARAMS, cfg)
    pre = optim.grad_preprocess(cfg, labels)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e3), PARAMS)
    out, _ = pre.update(grads, pre.init(PARAMS), PARAMS)
    flat = _flat(out)
    assert all(np.all(np.asarray(v) == 0) for k, v in flat.items() if EXPECTED[k] == "frozen")
    np.testing.assert_allclose(float(optim.global_norm(out)), 1.0, rtol=1e-5)
    # every trainable leaf is scaled by the same factor 1 / ||g_trainable||
    n_trainable = sum(v.size for k, v in flat.items() if EXPECTED[k] != "frozen")
    want = 1.0 / np.sqrt(n_trainable)
    np.testing.assert_allclose(np.asarray(flat["decoder/conv/kernel"]), want, rtol=1e-5)
    cfg.clip_grad_norm = 0.0
    pre = optim.grad_preprocess(cfg, labels)
    out, _ = pre.update(grads, pre.init(PARAMS), PARAMS)
    np.testing.assert_allclose(np.asarray(_flat(out)["decoder/conv/kernel"]), 1e3)


@pytest.mark.parametrize("step", [0, 1, 37, 99, 100, 150])
def test_poly_schedule_values(step):
    cfg = get_base_config().optim
    sched = optim.lr_schedule(cfg, total_steps=100)
    want = 3e-5 * (1 - min(step, 100) / 100) ** 0.9
    np.testing.assert_allclose(float(sched(step)), want, rtol=1e-6, atol=1e-12)


def test_warmup_schedule_values():
    cfg = get_base_config().optim
    cfg.warmup_steps = 10
    sched = optim.lr_schedule(cfg, total_steps=110)
    np.testing.assert_allclose(float(sched(5)), 3e-5 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 3e-5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(60)), 3e-5 * 0.5**0.9, rtol=1e-6)
    assert float(sched(110)) == 0.0
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.lr_schedule(cfg, total_steps=10)


def test_adam_uses_schedule_per_update():
    """First update of a decay-free leaf with grad g is -lr0*sign(g) (Adam), second uses lr(1)."""
    cfg = get_base_config().optim
    cfg.lr, cfg.weight_decay = 1.0, 0.0
    p = {"w": jnp.zeros((3,))}
    tx, sched = optim.make_optimizer(cfg, p, total_steps=4)
    st = tx.init(p)
    g = {"w": jnp.array([1.0, -2.0, 3.0])}
    u1, st = tx.update(g, st, p)
    np.testing.assert_allclose(np.asarray(u1["w"]), -np.sign(g["w"]), rtol=1e-5)
    u2, _ = tx.update(g, st, p)
    np.testing.assert_allclose(np.asarray(u2["w"]), -(0.75**0.9) * np.sign(g["w"]), rtol=1e-4)
    np.testing.assert_allclose(float(sched(1)), 0.75**0.9, rtol=1e-6)


def test_param_summary_counts():
    counts, rows = optim.param_summary(PARAMS, get_base_config().optim)
    assert counts["text_encoder"] == {"total": 40 + 4 + 4 + 16 + 4, "decay": 16,
                                      "no_decay": 4, "frozen": 48}
    assert counts["backbone"]["total"] == 18 + 48 + 12 + 8 + 4
    assert counts["backbone"]["decay"] == 48
    assert len(rows) == len(EXPECTED)
    assert ("decoder/conv/kernel", (3, 3, 4, 1), "decay") in rows
    table = optim.format_param_summary(counts)
    assert "TOTAL" in table and "text_encoder" in table


def test_nested_bert_embeddings_frozen():
    """VIPA nests BERT under the fusion encoder: encoder/text_encoder/embeddings/... ."""
    cfg = get_base_config().optim
    assert optim.label_fn("encoder/text_encoder/embeddings/word_embeddings/embedding",
                          cfg) == "frozen"
    assert optim.label_fn("encoder/text_encoder/encoder/layer/0/output/dense/kernel",
                          cfg) == "decay"
    assert optim.label_fn("encoder/my_text_encoder/embeddings/x/embedding", cfg) == "decay"


def test_lr_multipliers_scale_updates_first_match_wins():
    """'regex=mult': Adam's first update is -lr*sign(g); a matched leaf moves mult times as far,
    the first matching rule wins, unmatched and frozen leaves are unaffected."""
    cfg = get_base_config().optim
    cfg.lr, cfg.weight_decay = 0.5, 0.0
    cfg.lr_multipliers = ("relative_position_bias_table=20", "backbone/=0.1")
    tx, _ = optim.make_optimizer(cfg, PARAMS, total_steps=10)
    grads = jax.tree.map(lambda x: -jnp.ones_like(x), PARAMS)
    upd = _flat(tx.update(grads, tx.init(PARAMS), PARAMS)[0])
    np.testing.assert_allclose(
        upd["backbone/layers_0/blocks_0/attn/relative_position_bias_table"], 10.0, rtol=1e-5)
    np.testing.assert_allclose(upd["backbone/layers_0/blocks_0/attn/qkv/kernel"], 0.05, rtol=1e-5)
    np.testing.assert_allclose(upd["decoder/conv/kernel"], 0.5, rtol=1e-5)
    np.testing.assert_array_equal(upd["text_encoder/embeddings/word_embeddings/embedding"], 0.0)


@pytest.mark.parametrize("bad", ["backbone/", "=2", "backbone/=x", "backbone/=-1"])
def test_lr_multipliers_malformed_entry_is_named(bad):
    cfg = get_base_config().optim
    cfg.lr_multipliers = (bad,)
    with pytest.raises(ValueError, match="lr_multipliers entry"):
        optim.make_optimizer(cfg, PARAMS, total_steps=10)


def test_global_norm_grouped_equals_per_leaf():
    """'grouped' (one reduction per leaf shape and dtype, the leaves stacked) gives the
    per-leaf norm, for mixed shapes and dtypes, a lone leaf of its shape and an empty tree;
    'auto' is per leaf on a CPU backend and grouped elsewhere; a bad name is an error."""
    from vipa_jax.backend import compiling_for

    rng = np.random.default_rng(0)
    tree = {"a": [jnp.asarray(rng.standard_normal((3, 4)), jnp.float32) for _ in range(5)],
            "b": jnp.asarray(rng.standard_normal((7,)), jnp.bfloat16),
            "c": [jnp.asarray(rng.standard_normal((3, 4)), jnp.bfloat16) for _ in range(2)],
            "d": jnp.float32(2.0)}
    want = np.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2))
                       for x in jax.tree.leaves(tree)))
    for impl in ("per_leaf", "grouped", "auto"):
        np.testing.assert_allclose(float(optim.global_norm(tree, impl)), want, rtol=1e-6)
    assert float(optim.global_norm({}, "grouped")) == 0.0

    def count_reductions(impl: str) -> int:
        jaxpr = jax.make_jaxpr(lambda t: optim.global_norm(t, impl))(tree)
        return sum(e.primitive.name == "reduce_sum" for e in jaxpr.jaxpr.eqns)

    assert count_reductions("per_leaf") == 9
    assert count_reductions("grouped") == 4  # (3, 4) f32, (7,) bf16, (3, 4) bf16, ()
    assert count_reductions("auto") == (9 if jax.default_backend() == "cpu" else 4)
    with compiling_for("gpu"):
        assert count_reductions("auto") == 4
    with pytest.raises(ValueError, match="grad_norm must be one of"):
        optim.global_norm(tree, "fused")


def test_stacked_block_params_get_the_blocks_updates():
    """AdamW with its decay labels and a per-module lr on a Swin stage stored stacked
    (`swin.stack_block_pairs`) gives each block the update it gets unrolled (2 steps); and
    `swin.relayout_block_pairs` moves the whole optimizer state (moments inside optax's
    partition, with its masked leaves) between the layouts, as resuming in the other one does."""
    from vipa_jax.models.swin import SwinTransformer, relayout_block_pairs, stack_block_pairs

    model = SwinTransformer(embed_dim=8, depths=(5,), num_heads=(2,), window_size=4)
    params = {"backbone": model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]}
    rng = np.random.default_rng(0)
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
             for _ in range(2)]
    cfg = get_base_config().optim
    cfg.lr, cfg.weight_decay = 0.1, 0.5
    cfg.lr_multipliers = ("norm=0.25",)

    def updates(tree, grad_trees):
        tx, _ = optim.make_optimizer(cfg, tree, total_steps=10)
        state, out = tx.init(tree), []
        for g in grad_trees:
            u, state = tx.update(g, state, tree)
            out.append(u)
        return out, state

    plain, plain_state = updates(params, grads)
    stacked, stacked_state = updates(stack_block_pairs(params),
                                     [stack_block_pairs(g) for g in grads])
    labels = optim.param_labels(stack_block_pairs(params), cfg)
    assert labels["backbone"]["layers_0"]["block_pairs"]["blocks_1"]["norm1"]["scale"] == "no_decay"
    for u_plain, u_stacked in zip(plain, stacked, strict=True):
        want = stack_block_pairs(u_plain)
        assert jax.tree.structure(want) == jax.tree.structure(u_stacked)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(u_stacked), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9)

    for src, dst in ((plain_state, stacked_state), (stacked_state, plain_state)):
        moved = jax.jit(relayout_block_pairs)(src, dst)
        assert jax.tree.structure(moved) == jax.tree.structure(dst)
        for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(dst), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(stacked_state)) > 1e-3
    broken = jax.tree.map(lambda x: x, params)  # new containers
    del broken["backbone"]["layers_0"]["blocks_3"]["mlp"]
    with pytest.raises(KeyError, match="backbone/layers_0/blocks_3/mlp/fc1/bias"):
        relayout_block_pairs(broken, stack_block_pairs(params))
