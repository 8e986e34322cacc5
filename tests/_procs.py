"""Helpers for tests that start several processes (multi-host runs on localhost)."""

from __future__ import annotations

import socket
import subprocess


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
