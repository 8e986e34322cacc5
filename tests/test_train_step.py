"""Train step: sharded == single device, gradient accumulation == big batch, overfit, NaN guard."""

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _standin  # noqa: E402
from _procs import quick_env  # noqa: E402

from vipa_jax.train import loop  # noqa: E402
from vipa_jax.train import sharding as shd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

SHARDED_SCRIPT = r"""
import json, jax, numpy as np, _standin
from vipa_jax.train import optim, sharding as shd
out = {}
n = jax.device_count()
TP = ("embed=data", "conv_out=data", "table=data", "conv_in=model", "heads=model",
      "hidden=model")  # FSDP over data + tensor parallelism over model
for name, shape, fsdp, devs, rules in [
        ("single", (1, 1), False, jax.devices()[:1], ()), ("fsdp", (n, 1), True, None, ()),
        ("tp", (n // 2, 2), False, None, TP), ("fsdp_split", (n, 1), True, None, ()),
        ("dp", (n, 1), False, None, ()), ("fsdp_2d", (n // 2, 2), True, None, ())][:NUM_CASES]:
    losses, state = _standin.run_steps(shd.make_mesh(shape, devs), fsdp, steps=3, rules=rules,
                                       split=name.endswith("_split"))
    mask = jax.tree.leaves(optim.trainable_mask(state.params, _standin.get_config().optim))
    specs = [any(a is not None for a in x.sharding.spec) for x in jax.tree.leaves(state.params)]
    sharded = sum(specs)
    trainable_sharded = sum(s and m for s, m in zip(specs, mask))
    mu_sharded = sum(any(a is not None for a in getattr(x.sharding, "spec", ()))
                     for x in jax.tree.leaves(state.opt_state))
    on_model = sum("model" in x.sharding.spec for x in jax.tree.leaves(state.params))
    out[name] = {"losses": losses, "sharded": int(sharded), "mu_sharded": int(mu_sharded),
                 "on_model": int(on_model),
                 "trainable_sharded": int(trainable_sharded),
                 "ndev": len(state.params["decoder_head"]["kernel"].sharding.device_set),
                 "w": np.asarray(state.params["decoder_conv"]["kernel"]).ravel().tolist()}
print("RESULT" + json.dumps(out))
"""


def run_with_devices(code: str, n: int = 8, timeout: int = 300) -> dict:
    """Run ``code`` in a fresh interpreter with ``n`` simulated CPU devices; parse RESULT json."""
    env = quick_env(n, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def _check_sharded(r: dict, names: tuple[str, ...], n: int) -> None:
    ref = np.array(r["single"]["losses"])
    assert ref[0] > ref[-1]  # it is actually training
    for name in names:
        np.testing.assert_allclose(r[name]["losses"], ref, rtol=1e-4, err_msg=name)
        np.testing.assert_allclose(r[name]["w"], r["single"]["w"], rtol=1e-4, atol=1e-6)
        assert r[name]["ndev"] == n
    assert r["single"]["ndev"] == 1
    if "dp" in r:
        assert r["dp"]["sharded"] == 0
    # FSDP_RULES split the 2 conv kernels, the head, the embedding, the dense kernel and the
    # bias table over 'data' (min size 0 here); 1-D biases and norms stay replicated.
    assert r["fsdp"]["sharded"] == 6 and r["fsdp"]["on_model"] == 0
    # Adam mu and nu of every sharded trainable param are sharded the same way
    assert r["fsdp"]["mu_sharded"] == 2 * r["fsdp"]["trainable_sharded"] > 0
    if "tp" in r:  # decoder_conv (conv_in), head (conv_in), dense (hidden), table (heads)
        assert r["tp"]["on_model"] == 4, r["tp"]
    if "fsdp_split" in r:  # train.split_update: the same step as two programs
        split, fused = r["fsdp_split"], r["fsdp"]
        np.testing.assert_allclose(split["losses"], fused["losses"], rtol=1e-6)
        np.testing.assert_allclose(split["w"], fused["w"], rtol=1e-6, atol=1e-8)
        assert {k: split[k] for k in ("sharded", "mu_sharded")} == {
            k: fused[k] for k in ("sharded", "mu_sharded")}


def test_sharded_matches_single_device_2dev():
    """FSDP and tensor-parallel logical-axis rules on 2 simulated devices give the 1-device loss
    curve (rel <= 1e-4); FSDP with the step split in two programs gives FSDP's (rel 1e-6)."""
    r = run_with_devices(SHARDED_SCRIPT.replace("NUM_CASES", "4"), n=2)
    _check_sharded(r, ("fsdp", "tp", "fsdp_split"), 2)


@pytest.mark.slow
def test_sharded_matches_single_device_8dev():
    """DP, FSDP, FSDP + tensor parallel and FSDP on a 4x2 mesh over 8 simulated devices == 1
    device (rel <= 1e-4)."""
    r = run_with_devices(SHARDED_SCRIPT.replace("NUM_CASES", "6"), n=8)
    _check_sharded(r, ("dp", "fsdp", "tp", "fsdp_split", "fsdp_2d"), 8)


def test_split_update_is_the_same_step(monkeypatch):
    """train.split_update (`step.SplitTrainStep`): gradients and update as two programs, both
    compiled on the first call, give the one program's losses and state, with gradient
    accumulation, BatchNorm and the finite guard skipping a NaN step."""
    from vipa_jax.train.step import SplitTrainStep

    compiled = []
    compile_once = SplitTrainStep.compile
    monkeypatch.setattr(SplitTrainStep, "compile",
                        lambda self, *a: compiled.append(compile_once(self, *a)) or compiled[-1])
    mesh = _one_device_mesh()
    kw = dict(steps=4, batch=8, grad_accum=2, nan_at=1)
    l_one, s_one = _standin.run_steps(mesh, False, **kw)
    assert compiled == []
    l_two, s_two = _standin.run_steps(mesh, False, split=True, **kw)
    assert len(compiled) == 1 and len(compiled[0]) == 2  # two programs, compiled once
    assert np.isnan(l_one[1]) and np.isnan(l_two[1]) and l_one[3] < l_one[0]
    np.testing.assert_allclose(l_two, l_one, rtol=1e-6)
    assert int(s_two.step) == int(s_one.step) == 4
    for a, b in zip(jax.tree.leaves(s_one), jax.tree.leaves(s_two), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-8)
    assert np.asarray(s_two.batch_stats["decoder_bn"]["mean"]).any()  # BN stats moved


def _one_device_mesh():
    return shd.make_mesh((1, 1), jax.devices()[:1])


def test_grad_accumulation_equals_big_batch():
    """4 micro-batches of 4 == one batch of 16, incl. invalid examples (SGD: params = p - g)."""
    mesh = _one_device_mesh()
    kw = dict(steps=1, batch=16, use_bn=False, noise=False, tx=optax.sgd(1.0))
    l1, s1 = _standin.run_steps(mesh, False, grad_accum=1, **kw)
    l4, s4 = _standin.run_steps(mesh, False, grad_accum=4, **kw)
    np.testing.assert_allclose(l4, l1, rtol=1e-6)
    init = _standin.run_steps(mesh, False, **dict(kw, steps=0))[1]
    g1 = jax.tree.map(lambda a, b: np.asarray(a - b), init.params, s1.params)
    g4 = jax.tree.map(lambda a, b: np.asarray(a - b), init.params, s4.params)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(g1)) > 1e-3  # grads are real
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    # frozen BERT embeddings: exactly unchanged
    emb = lambda s: np.asarray(s.params["text_encoder"]["embeddings"]["word_embeddings"][  # noqa
        "embedding"])
    assert np.array_equal(emb(s4), emb(init))


@pytest.mark.slow
def test_grad_accumulation_with_adam_and_bn_runs():
    """BN + noise + Adam with k=2: finite and close to k=1 (BN stats differ by design)."""
    mesh = _one_device_mesh()
    l1, _ = _standin.run_steps(mesh, False, steps=2, batch=8)
    l2, _ = _standin.run_steps(mesh, False, steps=2, batch=8, grad_accum=2)
    assert np.all(np.isfinite(l2))
    np.testing.assert_allclose(l2[0], l1[0], rtol=0.05)


def test_overfit_tiny_batch():
    """One fixed batch of 4: the loss falls by >= 10x within 200 steps."""
    from vipa_jax.train import optim, step

    cfg = _standin.get_config()
    cfg.optim.lr = 3e-2
    cfg.optim.freeze_bert_embeddings = False
    model = _standin.StandIn(dim=16, use_bn=True, noise=False)
    batch = {k: jnp.asarray(v) for k, v in _standin.make_batch(4, seed=3).items()}
    params = jax.eval_shape(lambda: step.init_variables(model, jax.random.PRNGKey(0),
                                                        batch))["params"]
    tx, sched = optim.make_optimizer(cfg.optim, params, 1000)
    state = step.create_train_state(model, tx, jax.random.PRNGKey(0), batch)
    fn = jax.jit(step.make_train_step(model, _standin.loss_fn, tx, sched,
                                      optim.trainable_mask(params, cfg.optim)))
    rng = jax.random.PRNGKey(0)
    losses = []
    for _ in range(200):
        state, m = fn(state, batch, rng)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def _standin_step(finite_guard: str, grad_norm: str = "auto"):
    """(jitted stand-in train step with this finite_guard and grad_norm, initial state, batch)."""
    from vipa_jax.train import optim, step

    cfg = _standin.get_config()
    model = _standin.StandIn()
    batch = {k: jnp.asarray(v) for k, v in _standin.make_batch(4).items()}
    params = jax.eval_shape(lambda: step.init_variables(model, jax.random.PRNGKey(0),
                                                        batch))["params"]
    tx, sched = optim.make_optimizer(cfg.optim, params, 10)
    state = step.create_train_state(model, tx, jax.random.PRNGKey(0), batch)
    fn = jax.jit(step.make_train_step(model, _standin.loss_fn, tx, sched,
                                      optim.trainable_mask(params, cfg.optim),
                                      finite_guard=finite_guard, grad_norm=grad_norm))
    return fn, state, batch


@pytest.mark.parametrize("skip,norm", [("cond", "per_leaf"), ("select", "grouped")])
def test_nonfinite_step_keeps_state(skip, norm):
    fn, state, batch = _standin_step(skip, norm)
    bad = dict(batch, image=batch["image"].at[0, 0, 0, 0].set(jnp.nan))
    new, m = fn(state, bad, jax.random.PRNGKey(0))
    assert float(m["finite"]) == 0.0 and not np.isfinite(float(m["loss"]))
    assert int(new.step) == 1
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state, state.batch_stats)),
                    jax.tree.leaves((new.params, new.opt_state, new.batch_stats)), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    good, m = fn(new, batch, jax.random.PRNGKey(0))
    assert float(m["finite"]) == 1.0
    assert not np.array_equal(np.asarray(good.params["decoder_head"]["kernel"]),
                              np.asarray(state.params["decoder_head"]["kernel"]))
    with pytest.raises(ValueError, match="finite_guard"):
        _standin_step("where")
    with pytest.raises(ValueError, match="grad_norm must be one of"):
        _standin_step(skip, "fused")


def test_grad_norm_forms_log_the_same_norm():
    """The step's logged gradient norm is the same summed per leaf or per leaf shape."""
    norms = [float(fn(state, batch, jax.random.PRNGKey(0))[1]["grad_norm"])
             for fn, state, batch in (_standin_step("cond", g) for g in ("per_leaf", "grouped"))]
    assert norms[0] > 0
    np.testing.assert_allclose(norms[1], norms[0], rtol=1e-6)


def _tiny_cfg(**data):
    return _standin.loop_config(total_steps=6, every_steps=0, **data)


def test_loop_stops_on_nan_naming_the_step(tmp_path):
    cfg = _tiny_cfg(nan_at=2)
    with pytest.raises(loop.NonFiniteError, match="at step 3"):
        loop.train_and_evaluate(cfg, tmp_path)
    assert not (tmp_path / "checkpoints" / "3").exists()


def test_loop_skips_nan_when_configured(tmp_path):
    cfg = _tiny_cfg(nan_at=2)
    cfg.train.skip_nonfinite = True
    cfg.train.log_every = 6
    state = loop.train_and_evaluate(cfg, tmp_path)
    assert int(state.step) == 6
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and rows[-1]["train/skipped_steps"] == 1.0
    assert np.isfinite(rows[-1]["train/loss"])


def test_loop_logs_the_time_spent_waiting_for_input(tmp_path, monkeypatch):
    """`train/input_wait_frac`: the part of the wall time the loop waited for the next batch
    (reading it and putting it on the devices): most of it when that takes 300 ms per batch
    against a step of milliseconds (0.77 at 50 ms in a loaded CI run, 0.97 unloaded). Without
    the delay the stand-in's sub-millisecond step leaves 0.2-0.7 of the loop's time to the
    input, so the two are not compared."""
    host_to_global = loop.shd.host_to_global
    fracs = []
    for delay in (0.3, 0.0):
        def slow(*args, delay=delay):
            time.sleep(delay)
            return host_to_global(*args)

        monkeypatch.setattr(loop.shd, "host_to_global", slow)
        cfg = _tiny_cfg()
        cfg.train.log_every = 3
        loop.train_and_evaluate(cfg, tmp_path / f"d{delay}")
        rows = [json.loads(x) for x in (tmp_path / f"d{delay}" / "metrics.jsonl").read_text()
                .splitlines() if "train/input_wait_frac" in x]
        assert [r["step"] for r in rows] == [3, 6]
        assert all(0.0 <= r["train/input_wait_frac"] <= 1.0 for r in rows)
        fracs.append(rows[-1]["train/input_wait_frac"])
    print("input_wait_frac with and without the delay:", fracs)
    assert fracs[0] > 0.7, fracs


def test_loop_compiles_the_step_with_train_xla_options(tmp_path):
    """`train.xla_options` reaches the train step's compile, and only that program's: XLA's
    per-program dump option writes the step and nothing else; a malformed item stops the run
    before it builds anything."""
    cfg = _standin.loop_config(total_steps=2, every_steps=0)
    cfg.train.xla_options = "--xla_dump_to=" + str(tmp_path / "dump")
    loop.train_and_evaluate(cfg, tmp_path / "run")
    dumped = {p.name.split(".")[1] for p in (tmp_path / "dump").iterdir()}
    assert dumped == {"jit_train_step"}, dumped
    cfg.train.xla_options = "--xla_gpu_enable_triton_gemm"
    with pytest.raises(ValueError, match="train.xla_options: '--xla_gpu_enable_triton_gemm'"):
        loop.train_and_evaluate(cfg, tmp_path / "bad")
    assert not (tmp_path / "bad" / "checkpoints").exists()


FIXTURE_BERT = ROOT / "tests" / "fixtures" / "tiny_bert_flax"


def _fixture_vipa(**model: Any) -> tuple[Any, dict, dict]:
    """(config with init_bert = the tiny HF Flax BERT, random VIPA params, the fixture's tree)."""
    from flax.serialization import msgpack_restore

    from configs.synthetic import get_config
    from vipa_jax.models.vipa import build_model, init_variables

    cfg = get_config("test")
    cfg.model.bert.update(dict(hidden_size=32, num_attention_heads=4, intermediate_size=37,
                               num_hidden_layers=2))
    cfg.model.image_size = 32
    cfg.model.update(model)
    vipa = build_model(cfg.model)
    abstract = jax.eval_shape(
        lambda: init_variables(vipa, jax.random.key(0), 32, cfg.model.max_tokens))["params"]
    # random values in VIPA's parameter tree (init_pretrained only reads the tree): no compile
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract)
    cfg.train.init_bert = str(FIXTURE_BERT)
    ref = msgpack_restore((FIXTURE_BERT / "flax_model.msgpack").read_bytes())
    return cfg, params, ref.get("bert", ref)


def test_init_pretrained_bert_from_fixture():
    """init_pretrained copies a tiny HF Flax BERT into VIPA's text encoder (exact)."""
    cfg, params, ref = _fixture_vipa()
    out = loop.init_pretrained(params, cfg)
    got = out["encoder"]["text_encoder"]
    np.testing.assert_array_equal(got["embeddings"]["word_embeddings"]["embedding"],
                                  ref["embeddings"]["word_embeddings"]["embedding"])
    np.testing.assert_array_equal(got["encoder"]["layer"]["1"]["output"]["dense"]["kernel"],
                                  ref["encoder"]["layer"]["1"]["output"]["dense"]["kernel"])
    # everything outside the text encoder is untouched
    np.testing.assert_array_equal(out["decoder"]["head"]["kernel"],
                                  params["decoder"]["head"]["kernel"])
    cfg.train.init_swin = str(FIXTURE_BERT / "missing.pth")
    with pytest.raises((FileNotFoundError, ValueError, OSError)):
        loop.init_pretrained(params, cfg)


def test_init_pretrained_later_stage_layers_from_pretrained():
    """lang_later_from_pretrained: stage-2 BERT layer starts from pretrained layer 1 (exact)."""
    # stage 1 = pretrained layer 0; the stage-2 layer should receive pretrained layer 1
    cfg, params, ref = _fixture_vipa(lang_stage_layers=(1, 1, 0, 0),
                                     lang_later_from_pretrained=True)
    out = loop.init_pretrained(params, cfg)
    ref = ref["encoder"]["layer"]["1"]
    got = out["encoder"]["lang_layers_0_0"]
    for path in (("attention", "self", "query", "kernel"), ("output", "LayerNorm", "scale"),
                 ("intermediate", "dense", "bias")):
        a, b = got, ref
        for k in path:
            a, b = a[k], b[k]
        np.testing.assert_array_equal(a, b, err_msg="/".join(path))
    assert sorted(out["encoder"]["text_encoder"]["encoder"]["layer"]) == ["0"]
    # without the switch the new layer keeps its random init
    cfg.model.lang_later_from_pretrained = False
    out2 = loop.init_pretrained(params, cfg)
    np.testing.assert_array_equal(out2["encoder"]["lang_layers_0_0"]["output"]["dense"]["kernel"],
                                  params["encoder"]["lang_layers_0_0"]["output"]["dense"]["kernel"])


def test_loop_writes_overlay_images(tmp_path):
    """image_fn output lands in TensorBoard; overlays are uint8 with a caption strip."""
    cfg = _tiny_cfg()
    cfg.train.total_steps = 2
    cfg.train.image_every = 2
    model = _standin.StandIn()
    batch = _standin.make_batch(2, seed=5)
    fn = loop.make_overlay_image_fn(model, batch, ["a", "b"], mean=np.zeros(3), std=np.ones(3))
    seen = {}

    def spy(state, step):
        seen[step] = fn(state, step)
        return seen[step]

    loop.train_and_evaluate(cfg, tmp_path, image_fn=spy, model=model)
    imgs = seen[2]
    assert sorted(imgs) == ["predictions/0", "predictions/1"]
    assert imgs["predictions/0"].dtype == np.uint8
    assert imgs["predictions/0"].shape[1:] == (16, 3) and imgs["predictions/0"].shape[0] > 16
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_init_pretrained_swin_from_own_safetensors(tmp_path):
    """train.init_swin with a vipa_jax-format file replaces exactly encoder/backbone."""
    from vipa_jax.weights.swin import save_swin_params

    cfg, params, _ = _fixture_vipa()
    cfg.train.init_bert = ""
    new = jax.tree.map(lambda x: np.asarray(x) + 1.0, params["encoder"]["backbone"])
    cfg.train.init_swin = save_swin_params(new, tmp_path / "swin.safetensors")
    out = loop.init_pretrained(params, cfg)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(out["encoder"]["backbone"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(out["decoder"]["head"]["kernel"],
                                  params["decoder"]["head"]["kernel"])


def test_nonfinite_skip_modes_agree():
    """'cond' and 'select' take the same finite step (up to float rounding of the fusion)."""
    out = {}
    for skip in ("cond", "select"):
        fn, state, batch = _standin_step(skip)
        out[skip], _ = fn(state, batch, jax.random.PRNGKey(0))
    moved = 0
    for a, b, p in zip(jax.tree.leaves(out["cond"]), jax.tree.leaves(out["select"]),
                       jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
        moved += not np.array_equal(np.asarray(a), np.asarray(p))
    assert moved > 0


@pytest.mark.slow
def test_stacked_swin_params_train_like_unrolled():
    """model.swin.stacked_params: VIPA's jitted train step (AdamW with its decay labels, the
    finite guard) on the stacked tree gives the unrolled tree's losses and new weights, with a
    Swin stage of 5 blocks (2 pairs stacked, 1 apart)."""
    from configs.synthetic import get_config
    from vipa_jax.models.swin import stack_block_pairs
    from vipa_jax.train import optim, step

    rng = np.random.default_rng(0)
    cfg = get_config("test")
    cfg.model.swin.update(dict(depths=(1, 1, 5, 1), drop_path_rate=0.0))
    cfg.optim.update(dict(lr=1e-3, weight_decay=0.5, warmup_steps=0))
    b = 2
    batch = {"image": rng.standard_normal((b, 64, 64, 3)).astype(np.float32),
             "input_ids": rng.integers(1, 1000, (b, 8)).astype(np.int32),
             "attention_mask": np.ones((b, 8), np.int32),
             "mask": (rng.random((b, 64, 64)) > 0.7).astype(np.float32)}
    params0 = None

    def run(stacked: bool) -> tuple[list[float], Any]:
        nonlocal params0
        cfg.model.swin.update(dict(scan_blocks=stacked, stacked_params=stacked))
        model = loop.build_model(cfg)
        if params0 is None:
            params0 = step.init_variables(model, jax.random.key(0), batch)["params"]
        params = stack_block_pairs(params0) if stacked else params0
        tx, sched = optim.make_optimizer(cfg.optim, params, total_steps=10)
        state = step.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                                opt_state=tx.init(params))
        fn = jax.jit(step.make_train_step(model, loop.build_loss(cfg), tx, sched,
                                          optim.trainable_mask(params, cfg.optim)))
        losses, key = [], jax.random.key(1)
        for _ in range(2):
            state, metrics = fn(state, batch, key)
            losses.append(float(metrics["loss"]))
        return losses, state.params

    l0, p0 = run(False)
    l1, p1 = run(True)
    assert "block_pairs" in p1["encoder"]["backbone"]["layers_2"]
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p0, params0)
    assert max(jax.tree.leaves(moved["encoder"]["backbone"]["layers_2"])) > 1e-4
    for a, b in zip(jax.tree.leaves(stack_block_pairs(p0)), jax.tree.leaves(p1), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
