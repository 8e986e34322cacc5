"""Helpers for tests that start processes: multi-host runs on localhost, quick subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


TEST_XLA_FLAG = "--xla_backend_optimization_level=0"


def with_test_xla_flags(flags: str = "") -> str:
    """`flags` plus unoptimized XLA:CPU code (LLVM -O0: compiles ~2x faster; the suite compiles
    far more than it runs, and its timings are not figures), unless VIPA_TEST_OPTIMIZED=1 or
    `flags` already sets the level."""
    if os.environ.get("VIPA_TEST_OPTIMIZED") == "1" or "xla_backend_optimization_level" in flags:
        return flags
    return f"{flags} {TEST_XLA_FLAG}".strip()


def quick_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """Environment for a test subprocess of the repo's code: the repo and tests/ on PYTHONPATH,
    the HF hub offline, unoptimized XLA (`with_test_xla_flags`) with `devices` simulated host
    devices if given, plus `extra`."""
    count = f"--xla_force_host_platform_device_count={devices}" if devices else ""
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
            "HF_HUB_OFFLINE": "1", "XLA_FLAGS": with_test_xla_flags(count), **extra}


def free_port() -> int:
    """A free localhost TCP port (for the jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def communicate_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """Wait for every process (killing stragglers on error); assert each exited 0, showing its
    stderr tail otherwise. Returns [(stdout, stderr)]."""
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    return outs
