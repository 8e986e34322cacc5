"""The full VIPA model: paper-config shapes, tiny forward/backward, padding invariance, switches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import refcoco, synthetic
from vipa_jax.losses import vipa_loss
from vipa_jax.models.veg import num_selected
from vipa_jax.models.vipa import build_model, init_variables

from .test_veg import share_params

B = 2


def _batch(cfg, length=None):
    length = length or cfg.model.max_tokens
    size = cfg.model.image_size
    images = jax.random.normal(jax.random.key(1), (B, size, size, 3))
    ids = np.zeros((B, length), np.int32)
    ids[0, :5] = [101, 5, 17, 9, 102]
    ids[1, :7] = [101, 33, 8, 250, 4, 61, 102]
    mask = (ids > 0).astype(np.int32)
    gt = (jax.random.uniform(jax.random.key(2), (B, size, size)) > 0.7).astype(jnp.float32)
    return images, jnp.asarray(ids), jnp.asarray(mask), gt


@pytest.fixture(scope="module")
def tiny():
    cfg = synthetic.get_config("test")
    cfg.model.decoder.norm = "batch"  # the paper's decoder norm: statistics update in train mode
    model = build_model(cfg.model)
    variables = jax.jit(lambda k: init_variables(model, k, cfg.model.image_size,
                                                 cfg.model.max_tokens))(jax.random.key(0))
    assert jax.tree.leaves(variables["batch_stats"])
    return cfg, model, variables


def train_loss_fn(cfg, model, variables):
    """params -> (train-mode loss, (loss parts, updated batch_stats, model outputs)) of `model`
    on `_batch(cfg)` with fixed rngs."""
    images, ids, mask, gt = _batch(cfg)
    rngs = {"gumbel": jax.random.key(3), "dropout": jax.random.key(4)}

    def loss_fn(params):
        out, updates = model.apply({**variables, "params": params}, images, ids, mask,
                                   train=True, rngs=rngs, mutable=["batch_stats"])
        loss, parts = vipa_loss(out, {"mask": gt}, cfg.loss)
        return loss, (parts, updates["batch_stats"], out)

    return loss_fn


def loss_and_grads(cfg, model, variables):
    """Jitted value_and_grad of `train_loss_fn`: ((loss, aux), grads)."""
    fn = train_loss_fn(cfg, model, variables)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(variables["params"])


@pytest.fixture(scope="module")
def tiny_grads(tiny):
    """The tiny model's forward+backward (compiled once), shared by the tests below."""
    return loss_and_grads(*tiny)


def outputs(result):
    """The model outputs (train mode) in a `loss_and_grads` result."""
    (_, (_, _, out)), _ = result
    return out


def test_paper_config_shapes():
    cfg = refcoco.get_config()
    model = build_model(cfg.model)
    size, length = cfg.model.image_size, cfg.model.max_tokens
    variables = jax.eval_shape(lambda k: init_variables(model, k, size, length), jax.random.key(0))
    out = jax.eval_shape(
        lambda v: model.apply(
            v, jnp.zeros((1, size, size, 3)), jnp.zeros((1, length), jnp.int32),
            jnp.ones((1, length), jnp.int32), train=False,
        ),
        variables,
    )
    assert out["logits"].shape == (1, 480, 480)
    assert out["cls_relevance"].shape == (1, 15, 15)
    assert out["relevance"].shape == (1, 21, 15, 15)
    enc = variables["params"]["encoder"]
    # Swin-B stage widths and BERT-base stage 1 (layers 0-5) + one new layer per later stage
    assert enc["backbone"]["norm_3"]["scale"].shape == (1024,)
    assert sorted(enc["text_encoder"]["encoder"]["layer"]) == [str(i) for i in range(6)]
    assert enc["text_encoder"]["embeddings"]["word_embeddings"]["embedding"].shape == (30522, 768)
    n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    print(f"paper-config parameters: {n_params / 1e6:.1f}M")
    # Swin-B 86.9M + BERT (6 + 3 layers) + cross blocks + fusion/VEG/decoder
    assert 240e6 < n_params < 280e6, n_params


def test_tiny_forward_backward(tiny, tiny_grads):
    cfg, _, variables = tiny
    (loss, (parts, batch_stats, _)), grads = tiny_grads
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert set(parts) >= {"bce", "dice", "contrastive"}
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert all(np.all(np.isfinite(g)) for _, g in flat)
    # gradients flow into every part of the model
    for part in ("encoder", "advanced_lang", "veg", "decoder"):
        total = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads[part]))
        assert total > 0, f"no gradient reached {part}"
    sel = grads["veg"]["select_global"]
    assert float(jnp.abs(sel["phi_v"]["kernel"]).sum()) > 0
    assert float(jnp.abs(sel["log_tau"])) > 0
    # train mode updates every BatchNorm's running statistics
    for old, new in zip(jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(batch_stats),
                        strict=True):
        assert not np.allclose(np.asarray(old), np.asarray(new))


def test_selection_mask_has_k_ones(tiny, tiny_grads):
    cfg = tiny[0]
    sel = np.asarray(outputs(tiny_grads)["selection"]).reshape(B, cfg.model.max_tokens, -1)
    k = num_selected(cfg.model.veg.topk_ratio, sel.shape[-1])
    np.testing.assert_array_equal(sel.sum(-1), k)


def test_padding_invariance(tiny):
    cfg, model, variables = tiny
    images, ids, mask, _ = _batch(cfg, length=cfg.model.max_tokens)
    extra = 5
    ids2 = jnp.concatenate([ids, jnp.zeros((B, extra), jnp.int32)], 1)
    mask2 = jnp.concatenate([mask, jnp.zeros((B, extra), jnp.int32)], 1)

    @jax.jit  # both forwards in one program: one compile instead of two op-by-op runs
    def both(v):
        return (model.apply(v, images, ids, mask, train=False),
                model.apply(v, images, ids2, mask2, train=False))

    out, out2 = both(variables)
    diff = float(jnp.abs(out["logits"] - out2["logits"]).max())
    assert diff <= 1e-5, f"appending padding changed the logits by {diff:.2e}"
    np.testing.assert_allclose(out["cls_relevance"], out2["cls_relevance"], atol=1e-5)


def switched_variables(variables, model2, model_cfg):
    """`model2`'s variables: the base model's at every path and shape they share (so only the
    switch differs), the others from `model2`'s own init, jitted with the shared ones dead code
    (a few parameters to compile, not the whole model's initializers)."""
    def init(k):
        return init_variables(model2, k, model_cfg.image_size, model_cfg.max_tokens)

    key = jax.random.key(0)
    v2 = share_params(variables, jax.eval_shape(init, key))
    leaves, tree = jax.tree.flatten(v2)
    new = [i for i, x in enumerate(leaves) if isinstance(x, jax.ShapeDtypeStruct)]
    if new:
        fresh = jax.jit(lambda k: [jax.tree.leaves(init(k))[i] for i in new])(key)
        for i, x in zip(new, fresh, strict=True):
            leaves[i] = x
    return jax.tree.unflatten(tree, leaves)


# Model-level switches run by default; the VEG switches are also tested (forward, backward,
# output change) on the VEG alone in test_veg.py, and here on the whole model with -m slow.
SWITCHES = [
    ("fusion", "late"), ("fusion", "none"), ("fusion_op", "mul"),
    ("veg.kv", "vanilla_lang"), ("veg.kv", "advanced_lang"),
]
SLOW_SWITCHES = [
    ("veg.step1", False), ("veg.step2", False),
    ("veg.cues", "global"), ("veg.cues", "local"),
    ("veg.topk_ratio", 0.8),
    ("veg.selection", "threshold"), ("veg.selection", "none"),
]
_PARAMS = [pytest.param(k, v, id=f"{k}={v}") for k, v in SWITCHES] + [
    pytest.param(k, v, id=f"{k}={v}", marks=pytest.mark.slow) for k, v in SLOW_SWITCHES
]


@pytest.mark.parametrize("key,value", _PARAMS)
def test_switch_builds_trains_and_changes_output(tiny, tiny_grads, key, value):
    """The switched model initializes, trains (finite loss and gradients) and its train-mode
    logits differ from the base model's on the same batch, parameters and rngs (a switch that
    changed nothing would draw the same Gumbel noise and give the same logits)."""
    cfg, _, variables = tiny
    cfg2 = cfg.copy_and_resolve_references()
    section, _, name = key.rpartition(".")
    target = cfg2.model[section] if section else cfg2.model
    target[name] = value
    model2 = build_model(cfg2.model)
    v2 = switched_variables(variables, model2, cfg.model)
    (loss, (_, _, out)), grads = loss_and_grads(cfg2, model2, v2)
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    ref = outputs(tiny_grads)["logits"]
    diff = float(jnp.abs(out["logits"] - ref).max())
    assert diff > 1e-4, f"{key}={value} did not change the output (max diff {diff:.2e})"


def test_contrastive_switch_changes_loss(tiny, tiny_grads):
    cfg = tiny[0]
    gt = _batch(cfg)[3]
    out = outputs(tiny_grads)
    on = vipa_loss(out, {"mask": gt}, cfg.loss)[0]
    cfg2 = cfg.copy_and_resolve_references()
    cfg2.loss.contrastive = False
    off = vipa_loss(out, {"mask": gt}, cfg2.loss)[0]
    assert float(on) - float(off) > 1e-3


def _saved_bytes(cfg, model, variables) -> int:
    from benchmarks.common import saved_residual_bytes

    loss = train_loss_fn(cfg, model, variables)
    return saved_residual_bytes(lambda p: loss(p)[0], variables["params"])


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_same_loss_and_grads_fewer_saved_residuals(tiny, tiny_grads, policy):
    """model.remat recomputes every Swin/BERT block, fusion, cross layer and decoder block in the
    backward pass: the same loss, gradients and BatchNorm statistics, and far fewer values saved
    for the backward pass (counted by JAX before XLA, so this holds on every backend; XLA:CPU
    itself drops the rematerialization, jax#19822). BatchNorm (the paper's decoder norm) runs
    inside the rematerialized conv blocks. `model.remat_policy=dots` also keeps the blocks'
    projection / MLP matmul outputs: more saved than 'full', less than no remat."""
    cfg, model, variables = tiny
    cfg_remat = cfg.copy_and_resolve_references()
    cfg_remat.model.remat = True
    cfg_remat.model.remat_policy = policy
    model_remat = build_model(cfg_remat.model)
    (l0, (_, bs0, _)), g0 = tiny_grads
    (l1, (_, bs1, _)), g1 = loss_and_grads(cfg_remat, model_remat, variables)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(bs0), jax.tree.leaves(bs1), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    # (test_tiny_forward_backward checks that train mode updates the statistics)

    saved_plain = _saved_bytes(cfg, model, variables)
    saved_remat = _saved_bytes(cfg_remat, model_remat, variables)
    print(f"saved for backward: {saved_plain / 2**20:.2f} MiB plain, "
          f"{saved_remat / 2**20:.2f} MiB remat ({policy})")
    if policy == "full":
        assert saved_remat < 0.3 * saved_plain, (saved_plain, saved_remat)
    else:  # the matmul outputs on top of full remat's block inputs
        cfg_full = cfg_remat.copy_and_resolve_references()
        cfg_full.model.remat_policy = "full"
        saved_full = _saved_bytes(cfg_full, build_model(cfg_full.model), variables)
        print(f"  full remat: {saved_full / 2**20:.2f} MiB")
        assert 1.2 * saved_full < saved_remat < 0.9 * saved_plain, (
            saved_plain, saved_full, saved_remat)


def test_remat_policy_unknown_is_a_clear_error(tiny):
    cfg = tiny[0].copy_and_resolve_references()
    cfg.model.remat = True
    cfg.model.remat_policy = "everything"
    with pytest.raises(ValueError, match=r"model.remat_policy must be one of .*'dots'.*everything"):
        init_variables(build_model(cfg.model), jax.random.key(0), 32, 8)


def _dot_generals(jaxpr):
    """(operand dtypes, preferred_element_type) of every dot_general in a jaxpr, nested
    jaxprs (jit, remat, custom_jvp/vjp, scan) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append((tuple(v.aval.dtype for v in eqn.invars),
                          eqn.params["preferred_element_type"]))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _dot_generals(inner)
    return found


def test_bfloat16_products_ask_for_float32_results(tiny, tiny_grads):
    """`model.dot_results`: with 'float32' (the CPU's 'auto') most bfloat16 × bfloat16 products
    of the model, forward and backward of the train loss, ask XLA for float32 results (those in
    the form XLA:CPU's GEMM library takes: it then runs them there, on AMX where the CPU has
    it), and the program runs; with 'native' none does. The bfloat16 losses, logits and
    gradients of the two are about as close to the float32 model's as each other."""
    cfg, _, variables = tiny
    results, counts = {}, {}
    for mode in ("float32", "native"):
        cfg2 = cfg.copy_and_resolve_references()
        cfg2.model.dtype = "bfloat16"
        cfg2.model.dot_results = mode
        model = build_model(cfg2.model)
        loss_fn = train_loss_fn(cfg2, model, variables)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        dots = _dot_generals(jax.make_jaxpr(grad_fn)(variables["params"]).jaxpr)
        low = [pref for types, pref in dots if set(types) == {jnp.dtype(jnp.bfloat16)}]
        wide = sum(p == jnp.float32 for p in low)
        assert len(low) > 50, len(low)
        counts[mode] = wide
        if mode == "float32":  # all that XLA:CPU's GEMM library takes (layers._library_gemm)
            assert wide > 0.6 * len(low), (wide, len(low))
        else:  # (a product that asks for float32 itself still does)
            assert wide < 0.05 * counts["float32"], (wide, counts)
        # it runs: XLA:CPU cannot run a bf16 x bf16 -> f32 product outside that library
        (loss, (_, _, out)), grads = jax.jit(grad_fn)(variables["params"])
        results[mode] = (float(loss), np.asarray(out["logits"], np.float32), grads)
    (l32, o32, g32), (lnat, onat, gnat) = results["float32"], results["native"]
    (lref, (_, _, out_ref)), gref = tiny_grads
    oref = np.asarray(out_ref["logits"])
    for loss in (l32, lnat):
        np.testing.assert_allclose(loss, float(lref), rtol=5e-3)
    # (bfloat16 may flip a Gumbel top-k choice, which moves a few logits far: mean errors)
    e32, enat = (float(np.abs(o - oref).mean() / np.abs(oref).mean()) for o in (o32, onat))
    assert e32 < 1.5 * enat + 0.01 and e32 < 0.05, (e32, enat)

    def errors(grads):
        """Each leaf's relative gradient error against the float32 model (leaves whose
        gradient is not ~0 by symmetry, as the attention keys' biases' is)."""
        out = []
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(gref), strict=True):
            r = np.asarray(r, np.float32)
            if np.linalg.norm(r) > 1e-6:
                out.append(np.linalg.norm(np.asarray(g, np.float32) - r) / np.linalg.norm(r))
        return np.asarray(out)

    e32, enat = errors(g32), errors(gnat)
    print(f"median relative gradient error vs float32: {np.median(e32):.4f} (float32 results), "
          f"{np.median(enat):.4f} (native)")
    assert np.median(e32) < 1.5 * np.median(enat) + 0.01, (np.median(e32), np.median(enat))
    assert np.median(e32) < 0.1


def test_inference_cache_transposed_kernels(tiny, monkeypatch):
    """`with_inference_cache` on a CPU stores the (F, C) kernel of each `Dense` with few input
    rows (here every one: the test model's layers are below the weight threshold, lowered to 0),
    the uncached logits come out of it, and a GPU's model caches none, nor one whose
    `model.transposed_kernels` is 'off'."""
    from flax import traverse_util

    from vipa_jax.backend import compiling_for
    from vipa_jax.models import layers
    from vipa_jax.models.vipa import with_inference_cache

    cfg, model, variables = tiny
    monkeypatch.setattr(layers, "TRANSPOSED_KERNEL_MIN_WEIGHTS", 0)
    images, ids, mask, _ = _batch(cfg)
    cached = with_inference_cache(model, variables, images, ids, mask)
    flat = traverse_util.flatten_dict(cached[layers.TRANSPOSED_KERNELS])
    params = traverse_util.flatten_dict(variables["params"])
    names = {"/".join(p[:2]) for p in flat}
    # BERT, the language stages, the advanced language tokens, the VEG and the decoder's
    # keys/values (word rows), the decoder's 1/32 stage (B·2·2 pixel rows: a 64 px image)
    assert {"encoder/text_encoder", "advanced_lang/cross_attn", "veg/refine_local"} <= names, names
    assert len(flat) > 40, len(flat)
    for path, kt in flat.items():
        np.testing.assert_array_equal(np.asarray(kt), np.asarray(params[path]).T)

    def logits(v):
        return model.apply(v, images, ids, mask, train=False)["logits"]

    want = jax.jit(logits)(variables)
    np.testing.assert_allclose(np.asarray(jax.jit(logits)(cached)), np.asarray(want),
                               rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    with compiling_for("gpu"):
        assert layers.TRANSPOSED_KERNELS not in with_inference_cache(
            model, variables, jax.ShapeDtypeStruct(images.shape, images.dtype), ids, mask)
    # `model.transposed_kernels`: 'off' caches none; a bad value names the setting
    for setting in ("off", "on"):
        cfg2 = cfg.copy_and_resolve_references()
        cfg2.model.transposed_kernels = setting
        build = functools.partial(with_inference_cache, build_model(cfg2.model), variables,
                                  images, ids, mask)
        if setting == "off":
            assert layers.TRANSPOSED_KERNELS not in build()
        else:
            with pytest.raises(ValueError, match="model.transposed_kernels must be one of"):
                build()
