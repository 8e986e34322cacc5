"""Where XLA's compile time goes: per HLO pass, per pass pipeline and per compiler phase.

``python -m benchmarks.compile_phases [--module SUBSTR] [--top N] [--tag T] -- COMMAND...``
runs COMMAND (e.g. ``python -m benchmarks.gpu_aot --batch 16``) with XLA's pass timers logged
(``TF_CPP_VMODULE=hlo_pass_pipeline=1,gpu_compiler=1,cpu_compiler=1``) and prints, for each
compiled HLO module whose name contains SUBSTR (default: the one with the most pass time), its
compiler phases (XLA:GPU: ``GpuCompiler::RunHloPasses``, ``RunBackend``; XLA:CPU: "Running
HLO passes", "Compiling ... using JIT"), its pass pipelines and its slowest passes, in
seconds. The table goes to ``benchmarks/results/compile_phases-<machine>[-<tag>].json``; the
log (about 3 MB per paper-model train step) to the temp folder, or ``--log-out``. ``--log
FILE`` reads a log written before instead of running anything. COMMAND's exit status is this
script's.

XLA writes a line when a pass starts (``HLO pass NAME``), one when it ends (``HLO pass: NAME
time: 45.5 s (45520515 us)``), one when a pipeline starts on a module ("Running HLO pass
pipeline on module M: PIPELINE"), and one per scoped timer (the phases). `parse_log` follows
them per thread as a stack (see there).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from typing import Any

from benchmarks import common

VMODULE = "hlo_pass_pipeline=1,gpu_compiler=1,cpu_compiler=1"

_UNIT_S = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}
# glog's prefix: level, date, time, thread id, file:line]
_GLOG = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+(\d+) [^\s:]+:\d+\] (.*?)\s*$")
_PIPELINE = re.compile(r"Running HLO pass pipeline on module (\S+): (.*)$")
_PASS_START = re.compile(r"HLO pass (\S.*)$")
_PASS_END = re.compile(r"HLO pass: (.+?) time: ([0-9.]+) ?([a-z]+) ")
_TIMER = re.compile(r"^(.+?) time: ([0-9.]+) ?([a-z]+) \(")
_MODULE_IN_TIMER = re.compile(r"(?:for |on \[|Compiling \[)(\w[\w.\-]*)")


@dataclasses.dataclass
class ModuleTimes:
    """One HLO module's compile time by pass, pass pipeline and compiler phase (seconds)."""

    passes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    pipelines: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    phases: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    pass_runs: int = 0

    @property
    def pass_total(self) -> float:
        return sum(self.passes.values())

    def as_dict(self, top: int) -> dict[str, Any]:
        return {"pass_total_s": self.pass_total, "pass_runs": self.pass_runs,
                "phases_s": dict(self.phases.most_common()),
                "pipelines_s": dict(self.pipelines.most_common(top)),
                "passes_s": dict(self.passes.most_common(top))}


def seconds(value: str, unit: str) -> float:
    """XLA's printed duration ('45.5', 's') -> seconds; a ValueError for an unknown unit."""
    if unit not in _UNIT_S:
        raise ValueError(f"unknown time unit {unit!r} in XLA's log")
    return float(value) * _UNIT_S[unit]


# The phase that ends a compile: a module of the same name compiled again is a new entry
_LAST_PHASES = ("RunBackend", "using JIT")


@dataclasses.dataclass
class _Frame:
    """A pipeline (`pipeline` set) or a pass (`name` set) running on one thread."""

    module: str
    pipeline: str | None = None
    name: str | None = None
    holds_pipeline: bool = False  # a pass that runs a pipeline of its own module


def _innermost_pipeline(stack: list[_Frame]) -> _Frame | None:
    """The pipeline a thread is running its current pass in (None outside any)."""
    return next((f for f in reversed(stack) if f.pipeline is not None), None)


def parse_log(lines: Iterable[str]) -> dict[str, ModuleTimes]:
    """XLA's timer log -> {module name: its times}, in the order the modules first appear.

    Each thread's passes and pipelines are followed as a stack, from XLA's "Running HLO pass
    pipeline", "HLO pass NAME" (start) and "HLO pass: NAME time:" (end) lines, so that a
    pipeline run as a pass of another counts once (its own passes, not itself), a pass belongs
    to the pipeline it ran in, and another module compiled inside a pass (a Triton fusion's
    own pipeline inside priority fusion, autotuning's candidates on other threads) counts
    apart. The same program compiled again (`gpu_aot`'s variants are all `jit_train_step`)
    gets its own entry, `name#2`, `name#3`, ..., once the compile before it has finished.
    """
    modules: dict[str, ModuleTimes] = {}
    current: dict[str, str] = {}  # module name -> the key of its latest compile
    finished: set[str] = set()
    stacks: dict[str, list[_Frame]] = collections.defaultdict(list)  # per thread id
    for line in lines:
        g = _GLOG.match(line)
        if not g:
            continue
        stack, msg = stacks[g.group(1)], g.group(2)
        if m := _PIPELINE.search(msg):
            name = m.group(1)
            if name not in current or current[name] in finished:
                n = sum(1 for k in modules if k == name or k.startswith(name + "#"))
                current[name] = name if n == 0 else f"{name}#{n + 1}"
            key = current[name]
            modules.setdefault(key, ModuleTimes())
            while stack and stack[-1].pipeline is not None:  # a finished pipeline
                stack.pop()
            if stack and stack[-1].module == key:
                stack[-1].holds_pipeline = True
            stack.append(_Frame(key, pipeline=m.group(2)))
        elif m := _PASS_END.search(msg):
            name = m.group(1)
            while stack and stack[-1].name != name:  # pipelines this pass ran
                stack.pop()
            if not stack:
                continue
            frame = stack.pop()
            if frame.holds_pipeline:
                continue  # its own passes counted already
            owner = _innermost_pipeline(stack)
            t = seconds(m.group(2), m.group(3))
            times = modules[frame.module]
            times.passes[name] += t
            times.pipelines[owner.pipeline if owner else "?"] += t
            times.pass_runs += 1
        elif m := _PASS_START.search(msg):
            if (pipe := _innermost_pipeline(stack)) is not None:
                stack.append(_Frame(pipe.module, name=m.group(1)))
        elif m := _TIMER.search(msg):
            label = m.group(1).strip()
            named = _MODULE_IN_TIMER.search(label)
            if named:
                label = label.replace(named.group(1), "<module>")
            here = stack[-1].module if stack else None
            owner = current.get(named.group(1), named.group(1)) if named else here
            if owner is None:
                continue
            modules.setdefault(owner, ModuleTimes()).phases[label] += seconds(m.group(2),
                                                                              m.group(3))
            if any(p in label for p in _LAST_PHASES):
                finished.add(owner)
    return modules


def pick(modules: dict[str, ModuleTimes], substr: str | None) -> list[str]:
    """The modules to report: those whose name contains `substr`, else the one with the most
    pass time; a ValueError naming the modules seen when none matches."""
    if not modules:
        raise ValueError("XLA's log has no pass timers: was anything compiled?")
    if substr is None:
        return [max(modules, key=lambda n: modules[n].pass_total)]
    names = [n for n in modules if substr in n]
    if not names:
        seen = sorted(modules, key=lambda n: -modules[n].pass_total)[:10]
        raise ValueError(f"no compiled module's name contains {substr!r} (a program loaded "
                         f"from JAX's compilation cache is not compiled); the largest: {seen}")
    return names


def report(name: str, times: ModuleTimes, top: int) -> None:
    print(f"== {name}: {times.pass_total:.2f} s in {times.pass_runs} pass runs")
    for title, counter, n in (("phase", times.phases, None), ("pipeline", times.pipelines, top),
                              ("pass", times.passes, top)):
        rows = [[k, v] for k, v in counter.most_common(n)]
        if rows:
            common.print_table(rows, [title, "s"])


def gpu_name() -> str | None:
    """The first GPU's name from `nvidia-smi` (None without one); CUDA is not started here."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = out.stdout.strip().splitlines() if out.returncode == 0 else []
    return names[0].strip() if names else None


_INFO_LINE = re.compile(r"I\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\] ")  # XLA's (glog)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # `run_logged` kills the command on the way out


def run_logged(command: list[str], log_path: str) -> int:
    """Run `command` with XLA's pass timers on -> its exit status. All its stderr goes to
    `log_path`; what is not an info line of XLA's log (its tracebacks, warnings, errors) goes
    to this process's stderr too. A SIGTERM to this process stops the command (it must not
    keep the GPU)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0")
    env["TF_CPP_VMODULE"] = ",".join(v for v in (env.get("TF_CPP_VMODULE"), VMODULE) if v)
    try:
        proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True,
                                errors="replace")
    except OSError as e:
        print(f"compile_phases: cannot run {command[0]!r}: {e}", file=sys.stderr)
        return 127
    before = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with open(log_path, "w") as log:
            for line in proc.stderr:  # type: ignore[union-attr]
                log.write(line)
                if not _INFO_LINE.match(line):
                    sys.stderr.write(line)
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, before)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                usage="%(prog)s [options] (-- COMMAND... | --log FILE)")
    p.add_argument("--module", default=None, help="report the modules whose name contains this")
    p.add_argument("--top", type=int, default=15, help="pipelines and passes listed (15)")
    p.add_argument("--log", default=None, help="parse this log instead of running COMMAND")
    p.add_argument("--log-out", default=None,
                   help="where COMMAND's log goes (default: the temp folder)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--tag", default="", help="appended to the result's file name")
    args = p.parse_args(argv)
    if bool(command) == bool(args.log):
        p.error("give either a COMMAND after `--` or --log FILE")
    status = 0
    # the commit COMMAND ran at, not a later one; no JAX backend started here (on a GPU it
    # would take most of the memory COMMAND measures)
    started = common.machine_info(devices=False)
    if command:
        log_path = args.log_out or os.path.join(tempfile.gettempdir(), os.path.basename(
            common.result_path("compile_phases", args.out, args.tag))[:-5] + ".log")
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        status = run_logged(command, log_path)
        if not os.path.exists(log_path):  # the command did not start
            return status
        print(f"XLA's log: {log_path} (the command exited with {status})")
    else:
        log_path = args.log
    with open(log_path, errors="replace") as f:
        modules = parse_log(f)
    try:
        names = pick(modules, args.module)
    except ValueError as e:  # running a command: its own status stands
        print(f"compile_phases: {e}", file=sys.stderr)
        return status if command else 1
    for name in names:
        report(name, modules[name], args.top)
    result = {"machine_info": started, "gpu": gpu_name(), "command": command, "log": log_path,
              "exit_status": status,
              "modules": {n: modules[n].as_dict(args.top) for n in names}}
    print("wrote", common.write_result("compile_phases", result, args.out, args.tag))
    return status


if __name__ == "__main__":
    sys.exit(main())
