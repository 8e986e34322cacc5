"""Checkpoint retention, crash/kill/preempt-and-resume reproduce the uninterrupted run."""

import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _standin  # noqa: E402
from _procs import quick_env  # noqa: E402

from vipa_jax.train import loop  # noqa: E402
from vipa_jax.train.checkpoint import Checkpointer, abstract_like  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_keep_last_k_plus_best(tmp_path):
    ck = Checkpointer(tmp_path / "ck", keep=2, keep_best=True, async_save=False)
    state = {"w": jnp.arange(4.0)}
    for step in range(1, 6):
        metrics = {"val_mIoU": {2: 0.9, 4: 0.5}[step]} if step in (2, 4) else None
        ck.save(step, {"w": state["w"] + step}, meta={"step": step}, metrics=metrics)
    ck.wait()
    assert ck.all_steps() == [2, 4, 5]
    restored, meta = ck.restore(abstract_like(state), step=2)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0) + 2)
    assert meta == {"step": 2}
    ck.close()
    assert not list((tmp_path / "ck").glob("*tmp*"))


def _cfg(**data):
    return _standin.loop_config(total_steps=8, every_steps=4, **data)


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_crash_and_resume_in_process(tmp_path):
    """A crash at step 6 (after the step-4 checkpoint) + rerun == uninterrupted run, exactly."""
    ref = loop.train_and_evaluate(_cfg(), tmp_path / "a")
    with pytest.raises(_standin.SimulatedCrash):
        loop.train_and_evaluate(_cfg(crash_at=5), tmp_path / "b")
    assert Checkpointer(tmp_path / "b" / "checkpoints").latest_step() == 4
    resumed = loop.train_and_evaluate(_cfg(), tmp_path / "b")
    assert int(resumed.step) == int(ref.step) == 8
    _assert_same_params(resumed.params, ref.params)
    _assert_same_params(resumed.opt_state, ref.opt_state)
    _assert_same_params(resumed.batch_stats, ref.batch_stats)
    # training moved the params after the step-4 checkpoint (the comparison is not trivial)
    at4 = _final_params(tmp_path / "a", step=4)
    assert not np.array_equal(np.asarray(at4["decoder_head"]["kernel"]),
                              np.asarray(ref.params["decoder_head"]["kernel"]))


# --- subprocess runs of train.py (slow: ~3 interpreter starts + compiles each) -----------------
def _cmd(workdir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "tests/_standin.py"),
            "--workdir", str(workdir), "--config.train.total_steps=12",
            "--config.ckpt.every_steps=4", "--config.data.delay_s=0.05",
            "--config.sharding.mesh_shape=(1,1)"]


def _env() -> dict:
    return quick_env(JAX_PLATFORMS="cpu")


def _final_params(workdir: Path, step: int = 12):
    path = workdir / "checkpoints" / str(step) / "state"
    with warnings.catch_warnings():  # "Sharding info not provided": host arrays are what we want
        warnings.simplefilter("ignore", UserWarning)
        return ocp.PyTreeCheckpointer().restore(str(path))["params"]


def _run(workdir: Path) -> None:
    p = subprocess.run(_cmd(workdir), env=_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]


def _start_and_signal(workdir: Path, sig: int, after_step: int = 4) -> int:
    """Start train.py, send ``sig`` once checkpoint ``after_step`` is committed; exit code."""
    p = subprocess.Popen(_cmd(workdir), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    try:
        while not (workdir / "checkpoints" / str(after_step)).is_dir():
            assert p.poll() is None, f"train.py exited early: {p.stderr.read()[-3000:]}"
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    if sig == signal.SIGTERM:
        assert p.returncode == 0, err[-3000:]
    return p.returncode


@pytest.mark.slow
def test_sigkill_and_sigterm_resume_train_py(tmp_path):
    """train.py killed (SIGKILL) or preempted (SIGTERM) mid-run, rerun: same final params."""
    _run(tmp_path / "ref")
    ref = _final_params(tmp_path / "ref")

    rc = _start_and_signal(tmp_path / "kill", signal.SIGKILL)
    assert rc == -signal.SIGKILL
    steps = Checkpointer(tmp_path / "kill" / "checkpoints").all_steps()
    assert 4 in steps and 12 not in steps
    _run(tmp_path / "kill")
    _assert_same_params(_final_params(tmp_path / "kill"), ref)

    _start_and_signal(tmp_path / "term", signal.SIGTERM)
    steps = Checkpointer(tmp_path / "term" / "checkpoints").all_steps()
    assert max(steps) > 4 and 12 not in steps  # a preemption checkpoint was written
    _run(tmp_path / "term")
    _assert_same_params(_final_params(tmp_path / "term"), ref)


def test_resume_with_another_param_tree_names_the_difference(tmp_path):
    """A checkpoint whose params differ from the config's tree is refused before orbax's
    restore, naming the paths on each side, unless the only difference is Swin's layout
    (`stacked_params`), which resuming converts."""
    from vipa_jax.models.swin import stack_block_pairs

    block = {"attn": {"kernel": np.ones((3, 3), np.float32)}, "norm1": {"scale": np.ones(3)}}
    plain = {"backbone": {"layers_0": {f"blocks_{j}": block for j in range(4)}}}
    ck = Checkpointer(tmp_path / "ck", keep=2, async_save=False)
    ck.save(1, {"params": stack_block_pairs(plain), "step": np.zeros((), np.int32)})
    ck.wait()
    assert loop.check_saved_params(ck, 1, stack_block_pairs(plain)) is False  # the same tree
    assert loop.check_saved_params(ck, 1, plain) is True  # the other layout: converted
    extra = {"backbone": dict(plain["backbone"], head={"kernel": np.ones(2)})}
    with pytest.raises(ValueError, match="only in the config") as e:
        loop.check_saved_params(ck, 1, extra)  # another layout and another parameter
    assert "4 only in the checkpoint" in str(e.value) and "9 only in the config" in str(e.value)
    assert "backbone/layers_0/block_pairs/blocks_0/attn/kernel" in str(e.value)
    other = {"backbone": {"layers_0": {"block_pairs": {"blocks_0": block}}}}
    with pytest.raises(ValueError, match="only in the config"):
        loop.check_saved_params(ck, 1, other)


@pytest.mark.slow
def test_resume_in_the_other_swin_layout(tmp_path, caplog):
    """A run saved with Swin's blocks unrolled resumes with `model.swin.stacked_params=True`
    (and back): params and AdamW moments are converted, and the run goes on as the unrolled one
    did (a tiny VIPA with a 4-block stage on the stand-in data; checkpoint 4 removed, so the
    resumed run redoes steps 3-4 from checkpoint 2)."""
    from configs.synthetic import get_config
    from vipa_jax.models.swin import has_block_pairs, stack_block_pairs

    def cfg(stacked, steps=4):
        c = _standin.loop_config(total_steps=steps, every_steps=2)
        syn = get_config("test").model
        syn.swin.update(dict(depths=(1, 1, 4, 1), scan_blocks=stacked, stacked_params=stacked))
        syn.bert.vocab_size = c.model.vocab
        c.model = syn
        c.train.log_every = 1
        return c

    ref = loop.train_and_evaluate(cfg(False), tmp_path / "run")
    assert not has_block_pairs(ref.params)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")
    with caplog.at_level("WARNING", logger=loop.__name__):
        resumed = loop.train_and_evaluate(cfg(True), tmp_path / "run")
    assert "block pairs unstacked; converted them" in caplog.text
    assert int(resumed.step) == 4 and has_block_pairs(resumed.params)
    for a, b in zip(jax.tree.leaves(stack_block_pairs(ref.params)),
                    jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    at2 = _final_params(tmp_path / "run", step=2)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), ref.params, at2)
    assert max(jax.tree.leaves(moved["encoder"]["backbone"]["layers_2"])) > 1e-4
    # and back: the stacked checkpoint 4 resumes into the unrolled layout
    again = loop.train_and_evaluate(cfg(False, steps=6), tmp_path / "run")
    assert int(again.step) == 6 and not has_block_pairs(again.params)
