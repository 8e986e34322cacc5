"""Two-process (multi-host) training on CPU via jax.distributed on localhost."""

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _procs import communicate_all, free_port, quick_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_training(tmp_path):
    """2 processes x 2 CPU devices: a (4,1) mesh trains 6 steps, checkpoints both data iterators."""
    port = free_port()
    env = quick_env(2, JAX_PLATFORMS="cpu")
    procs = []
    for pid in range(2):
        cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "tests/_standin.py"),
               "--workdir", str(tmp_path / "run"), "--distributed",
               f"--coordinator_address=localhost:{port}", "--num_processes=2",
               f"--process_id={pid}", "--config.train.total_steps=6",
               "--config.ckpt.every_steps=3", "--config.train.log_every=1",
               "--config.sharding.fsdp=True"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = communicate_all(procs, timeout=400)
    assert "process 1/2, 2 local / 4 global devices" in outs[1][1]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # only process 0 writes
    assert all(r["train/loss"] > 0 for r in rows)
    ck = tmp_path / "run" / "checkpoints" / "6"
    assert (ck / "state").is_dir()
    assert sorted(p.name for p in (ck / "data_iter").iterdir() if p.suffix == ".json") == [
        "process_0-of-2.json", "process_1-of-2.json"]
