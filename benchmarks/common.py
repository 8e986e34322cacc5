"""Shared benchmark helpers: machine info, timing, JSON results, tables.

Timing protocol (`time_calls`): each callable is warmed up, then the callables are run in
alternating blocks (a a a, b b b, a a a, b b b) so that background load on a shared machine
hits every contender alike; JAX outputs are waited on with `jax.block_until_ready`. Report
ratios from one run, never absolute times from different runs.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _git_commit() -> str:
    """`git rev-parse --short HEAD`; `VIPA_GIT_COMMIT` where the code travels without its .git
    (a device machine gets a copy of the working tree)."""
    if os.environ.get("VIPA_GIT_COMMIT"):
        return os.environ["VIPA_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _git_dirty() -> bool | None:
    """Uncommitted changes to the code a benchmark measures (None if git is unavailable;
    `VIPA_GIT_DIRTY=0|1` where the code travels without its .git)."""
    if os.environ.get("VIPA_GIT_DIRTY") in ("0", "1"):
        return os.environ["VIPA_GIT_DIRTY"] == "1"
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "vipa_jax", "benchmarks/*.py", "configs"],
            capture_output=True, text=True, timeout=10,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first CPU's `key: value` lines of `/proc/cpuinfo` ({} where there is none); read
    once per process (machine_info asks for the model, the ISA and the family/model)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if info:
                        break
                    continue
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def _cpu_model() -> str:
    """CPU model name (`/proc/cpuinfo` on Linux; platform.processor() is often empty)."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_isa(flags: str | None = None) -> str:
    """The widest vector ISA the CPU reports: 'avx512' (with 'amx' / 'bf16' noted), 'avx2',
    'avx', 'sse', 'sve', 'neon', or 'unknown'.

    CPU results depend on it far more than on the model name: two VMs both called "AMD EPYC"
    ran XLA:CPU's GEMMs/convolutions at ~2x different speeds relative to PyTorch.
    """
    if flags is None:
        info = _cpuinfo()
        flags = info.get("flags") or info.get("Features") or ""
    have = set(flags.split())
    if "avx512f" in have:
        extra = [x for x, f in (("bf16", "avx512_bf16"), ("amx", "amx_tile")) if f in have]
        return "+".join(["avx512", *extra])
    for isa, flag in (("avx2", "avx2"), ("avx", "avx"), ("sse", "sse4_2"), ("sve", "sve"),
                      ("neon", "asimd")):
        if flag in have:
            return isa
    return "unknown"


def _cpu_id() -> str:
    """`vendor family F model M` from /proc/cpuinfo (x86), '' elsewhere."""
    info = _cpuinfo()
    if "cpu family" not in info:
        return ""
    vendor, model = info.get("vendor_id", "?"), info.get("model", "?")
    return f"{vendor} family {info['cpu family']} model {model}"


def machine_name() -> str:
    """Short file-name-safe machine id, e.g. `vm-2cpu` (node name + the machine's cpu count)."""
    node = re.sub(r"[^A-Za-z0-9_.-]+", "_", platform.node() or "unknown")
    return f"{node}-{os.cpu_count()}cpu"


def cpu_count() -> int:
    """CPUs this process may use (affinity-aware where the OS supports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def pin_cpus(n: int) -> list[int]:
    """Restrict this process to its first n allowed CPUs (call before importing jax/torch)."""
    cpus = sorted(os.sched_getaffinity(0))[:max(1, n)]
    os.sched_setaffinity(0, cpus)
    return cpus


def device_tag(backend: str, device_kind: str) -> str:
    """A result file's device part: the CPU's vector ISA (VMs of one machine name differ in it,
    `cpu_isa`), else the device kind, lower case, non-word runs as '_' ('nvidia_h200')."""
    if backend == "cpu":
        return cpu_isa()
    return re.sub(r"\W+", "_", device_kind.lower()).strip("_")


def use_device(device: str) -> None:
    """A script's `--device auto|cpu|gpu`: 'cpu' hides accelerators (call it before JAX starts
    its backends); 'gpu' without JAX's GPU backend is a SystemExit that says so."""
    if device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if device == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit(f"--device gpu but JAX's backend is {jax.default_backend()!r}")


def machine_info(devices: bool = True) -> dict[str, Any]:
    """Where a number was measured: host, CPU, versions, git commit, load at the time.
    `devices=False`: JAX's version only, without starting its backend (a process that only
    launches the one measuring must not take the GPU's memory)."""
    info: dict[str, Any] = {
        "machine": machine_name(),
        "node": platform.node(),
        "processor": _cpu_model(),
        "cpu_isa": cpu_isa(),
        "cpu_id": _cpu_id(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_used": cpu_count(),
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        info["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    try:
        import jax

        info["jax"] = jax.__version__
        if devices:
            info["jax_backend"] = jax.default_backend()
            info["jax_devices"] = [str(d) for d in jax.devices()]
            info["device_kind"] = jax.devices()[0].device_kind
        info["jaxlib"] = _version("jaxlib")
        info["flax"] = _version("flax")
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def _version(dist: str) -> str | None:
    """Installed version of a distribution (None if absent)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def busy_processes(min_cpu_percent: float = 20.0) -> int:
    """Other processes using ≥ min_cpu_percent CPU right now (from `ps`), -1 if unknown."""
    try:
        out = subprocess.run(["ps", "-eo", "pid=,pcpu="], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return -1
    me = os.getpid()
    n = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and int(parts[0]) != me and float(parts[1]) >= min_cpu_percent:
            n += 1
    return n


def load_snapshot() -> dict[str, Any]:
    """Load average and number of other busy processes (timings on a shared box are noisy)."""
    snap: dict[str, Any] = {"busy_other_processes": busy_processes()}
    try:
        snap["loadavg_1"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        pass
    return snap


def _block(out: Any) -> Any:
    try:
        import jax

        return jax.block_until_ready(out)
    except ImportError:  # pragma: no cover
        return out


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Seconds -> {median, p90, min, mean, n} (p90 by nearest rank)."""
    s = sorted(times)
    p90 = s[min(len(s) - 1, max(0, int(round(0.9 * len(s) + 0.5)) - 1))]
    return {"median_s": statistics.median(s), "p90_s": p90, "min_s": s[0],
            "mean_s": statistics.fmean(s), "n": len(s)}


def time_call(fn: Callable[[], Any], *, iters: int = 5, warmup: int = 1) -> dict[str, float]:
    """Time one zero-argument callable: `warmup` untimed calls, then `iters` timed ones."""
    return time_calls({"f": fn}, iters=iters, warmup=warmup, rounds=1)["f"]


def time_calls(
    fns: Mapping[str, Callable[[], Any]], *, iters: int = 5, warmup: int = 1, rounds: int = 2,
) -> dict[str, dict[str, float]]:
    """Time several callables in alternating blocks; each result is `summarize` of its times.

    The `iters` timed calls of each callable are split into `rounds` blocks, run a, b, a, b
    so that background load hits every contender alike. Each block starts with one untimed
    call: switching between JAX and PyTorch call by call makes the next PyTorch call wait for
    its thread pool (x100 slower for small models on 2 cores), and blocks avoid that. The
    first call of each callable is timed separately as `first_call_s` (for a not yet compiled
    `jax.jit` function: trace + compile + one run).
    """
    rounds = max(1, min(rounds, iters))
    first: dict[str, float] = {}
    for name, fn in fns.items():
        for w in range(max(warmup, 1)):
            t0 = time.perf_counter()
            _block(fn())
            if w == 0:
                first[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in fns}
    per_round = [iters // rounds + (r < iters % rounds) for r in range(rounds)]
    for r in range(rounds):
        for name, fn in fns.items():
            if r > 0 or len(fns) > 1:
                _block(fn())  # untimed: settles the thread pools after the other framework
            for _ in range(per_round[r]):
                t0 = time.perf_counter()
                _block(fn())
                times[name].append(time.perf_counter() - t0)
    return {name: {**summarize(ts), "first_call_s": first[name]} for name, ts in times.items()}


_CACHE_HITS = [0]  # persistent compilation cache hits in this process (`compile_jax`)


@functools.cache
def _count_cache_hits() -> None:
    """Register, once per process, a listener that counts cache hits in `_CACHE_HITS`."""
    import jax

    def on_event(event: str, **_: Any) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            _CACHE_HITS[0] += 1

    jax.monitoring.register_event_listener(on_event)


COMPILE_ONLY_ENV = "VIPA_BENCH_COMPILE_ONLY"


class CompiledOnly(BaseException):
    """Raised by `compile_jax` after compiling when `$VIPA_BENCH_COMPILE_ONLY` is set: the
    program is in JAX's persistent compilation cache, nothing runs (`device_suite.sh`'s
    `precompile` compiles the later steps' programs in parallel processes this way). A
    `BaseException`, so that the scripts' `except Exception` (out-of-memory, compile errors)
    let it through; a script that compiles several programs catches it per program."""


def compile_jax(
    fn: Callable[..., Any], *args: Any, **jit_kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """`jax.jit(fn, **jit_kwargs)` lowered and compiled for `args` -> (compiled, {compile_s, ...}).

    `flops` is XLA's HloCostAnalysis count of the compiled program: a multiply-add is 2 flops,
    and elementwise ops (softmax, norms, GELU, ...) count too; transcendentals are reported
    separately. `hlo_flops` is the same count of the HLO before XLA's optimizations, the same
    on every backend: XLA:GPU turns convolutions and most matmuls into cuDNN / cuBLAS custom
    calls that its compiled count leaves out (the paper-config forward: 435 GFLOPs before, 0.16
    T after on an H200), so utilization figures use `hlo_flops`. Where that count is 0 (XLA:GPU
    under jax 0.11.2 gave 0 for the paper-config train step on 2026-12-04) it is 2 x the
    multiply-adds of the jaxpr's dots and convolutions (`count_macs`; on CPU the two counts of
    that step at batch 2 differ by 0.3%), and `hlo_flops_source` says `jaxpr_macs`.
    `cache_hit`: the program came from JAX's persistent compilation cache
    (`JAX_COMPILATION_CACHE_DIR`), so `compile_s` is a load time, not a compile time. With
    `$VIPA_BENCH_COMPILE_ONLY` set it raises `CompiledOnly(info)` once the program is compiled
    (and cached).
    """
    import jax

    from vipa_jax.train.step import SplitTrainStep, compose_step

    _count_cache_hits()
    hits = _CACHE_HITS[0]
    split = isinstance(fn, SplitTrainStep)  # its own jit options; `jit_kwargs` are not used
    t0 = time.perf_counter()
    lowered = fn.lower(*args) if split else jax.jit(fn, **jit_kwargs).lower(*args)
    t1 = time.perf_counter()
    compiled = Programs(*fn.compile_lowered(lowered)) if split else lowered.compile()
    t2 = time.perf_counter()
    info: dict[str, Any] = {"lower_s": t1 - t0, "compile_s": t2 - t1,
                            "cache_hit": _CACHE_HITS[0] > hits}
    if split:
        info["program_compile_s"] = dict(fn.compile_s)
    info.update(cost_of(compiled))
    info["hlo_flops"] = sum(cost_of(low)["flops"] for low in (lowered if split else [lowered]))
    info["hlo_flops_source"] = "hlo"
    if not info["hlo_flops"]:  # XLA:GPU (jax 0.11.2) counted 0 for the unoptimized train step
        traced = compose_step(fn.parts) if split else fn
        info["hlo_flops"], info["hlo_flops_source"] = 2.0 * count_macs(traced, *args), "jaxpr_macs"
    if os.environ.get(COMPILE_ONLY_ENV):
        print(f"compiled only (${COMPILE_ONLY_ENV}): {getattr(fn, '__name__', 'fn')}, lower "
              f"{info['lower_s']:.1f} s + compile {info['compile_s']:.1f} s, cache hit "
              f"{info['cache_hit']}", flush=True)
        raise CompiledOnly(info)
    return compiled, info


class Programs:
    """Programs that run as one step (`train.split_update`: `step.SplitTrainStep`), read as one
    compiled program: `cost_analysis` sums their counts, `memory_analysis` is the largest
    program's (each holds the state as an argument, so the step's peak is that program's), and
    `as_text` joins their HLO. `parts`: the compiled programs, in order."""

    def __init__(self, *parts: Any) -> None:
        self.parts = parts

    def cost_analysis(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for part in self.parts:
            for k, v in cost_of(part).items():
                total[k] = total.get(k, 0.0) + v
        return total

    def memory_analysis(self) -> Any:
        sizes = [memory_of(p) for p in self.parts]  # `memory_of`'s estimate decides
        if None in sizes:
            return None
        largest = max(range(len(sizes)), key=lambda i: sizes[i]["estimate_bytes"])
        return self.parts[largest].memory_analysis()

    def as_text(self) -> str:
        return "\n".join(p.as_text() for p in self.parts)


def cost_of(compiled: Any) -> dict[str, float]:
    """flops / transcendentals / bytes accessed from a compiled (or lowered) JAX computation."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX returned one dict per device
        cost = cost[0] if cost else {}
    cost = cost or {}
    out = {"flops": float(cost.get("flops", 0.0))}
    for key in ("transcendentals", "bytes accessed"):
        if key in cost:
            out[key.replace(" ", "_")] = float(cost[key])
    return out


def memory_of(compiled: Any) -> dict[str, int] | None:
    """XLA's buffer sizes of a compiled computation (`memory_analysis()`), None if unavailable.

    `estimate_bytes` = arguments + outputs + temporaries − aliased (donated) bytes: the device
    memory the call needs by XLA's own count, available on every backend (CPU included).
    """
    try:
        m = compiled.memory_analysis()
    except (AttributeError, NotImplementedError):  # pragma: no cover
        return None
    if m is None:
        return None
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0))
           for k in ("argument", "output", "temp", "alias")}
    out["estimate_bytes"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def saved_residual_bytes(fn: Callable[..., Any], *args: Any) -> int:
    """Bytes that reverse-mode autodiff of `fn` saves for the backward pass (JAX's own count,
    before XLA; `jax.ad_checkpoint.print_saved_residuals` lists them). Function arguments are
    not counted (they live anyway). Backend-independent: it shows what `jax.checkpoint` removes
    even where XLA:CPU then undoes it (jax#19822)."""
    import numpy as np
    from jax._src.ad_checkpoint import saved_residuals

    return sum(int(np.prod(aval.shape)) * aval.dtype.itemsize
               for aval, where in saved_residuals(fn, *args) if "from the argument" not in where)


def device_memory() -> dict[str, int] | None:
    """`jax.devices()[0].memory_stats()` (bytes in use, peak, limit); None where the backend has
    none (the CPU backend returns None)."""
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats}


def _top_level_items(text: str) -> list[str]:
    """`text` split at the commas outside brackets and quotes: 'a=(1,2),b=c' -> ['a=(1,2)',
    'b=c']; an unbalanced bracket or quote is a ValueError."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced {ch!r} at position {i}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth or quote:
        raise ValueError("unclosed " + (f"quote {quote}" if quote else "bracket"))
    return [*items, text[start:]]


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """'cond:train.finite_guard=cond,model.remat=True' -> ('cond', {...: 'cond', ...: True}).
    Values are Python literals where they parse as one (commas inside brackets belong to the
    value: 'd6:model.swin.depths=(2,2,6,2)'), else strings."""
    name, sep, rest = text.partition(":")
    if not sep or not name or not rest:
        raise ValueError(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
    try:
        items = _top_level_items(rest)
    except ValueError as e:
        raise ValueError(f"--variant {text!r}: {e}") from None
    overrides: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--variant {text!r}: {item!r} is not KEY=VALUE")
        try:
            overrides[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key.strip()] = value  # a bare word: a string
    return name, overrides


def result_path(name: str, out_dir: str | None = None, tag: str = "") -> str:
    """`<out_dir>/<name>-<machine>[-<tag>].json`, where `write_result` writes."""
    return os.path.join(out_dir or RESULTS_DIR,
                        f"{name}-{machine_name()}{'-' + tag if tag else ''}.json")


def write_result(
    name: str, result: Mapping[str, Any], out_dir: str | None = None, tag: str = "",
) -> str:
    """Write `result` (+ machine info under "machine_info") to `<out_dir>/<name>-<machine>.json`.

    A non-empty `tag` is appended: `<name>-<machine>-<tag>.json`.
    """
    path = result_path(name, out_dir, tag)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    payload = {"benchmark": name, "machine_info": machine_info(), **result}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")
    return path


def _json_default(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Plain-text table with right-aligned numeric columns."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(header)]
    numeric = [all(isinstance(r[i], (int, float)) for r in rows) for i in range(len(header))]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(vals, widths, numeric, strict=True)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(header)), sep, *(line(r) for r in cells)])


def print_table(rows: Sequence[Sequence[Any]], header: Sequence[str], title: str = "") -> None:
    """Print `format_table`, with an optional title line."""
    if title:
        print(title)
    print(format_table(rows, header))


# ------------------------------------------------------------------------------------------
# Multiply-accumulate count from the jaxpr (the fvcore / "papers' FLOPs" convention)
# ------------------------------------------------------------------------------------------


def _prod(xs: Sequence[int]) -> int:
    n = 1
    for x in xs:
        n *= int(x)
    return n


def _eqn_macs(eqn: Any) -> int:
    name = eqn.primitive.name
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return _prod(eqn.outvars[0].aval.shape) * _prod(lhs[d] for d in lhs_contract)
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
        # every output element = (kernel spatial) x (in features / groups) MACs
        return _prod(eqn.outvars[0].aval.shape) * (_prod(rhs) // rhs[out_feature_dim])
    return 0


def _sub_jaxprs(eqn: Any) -> list[tuple[Any, int]]:
    """(closed or open jaxpr, repeat count) pairs nested in an equation's params."""
    subs: list[tuple[Any, int]] = []
    reps = int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if hasattr(item, "eqns") or hasattr(item, "jaxpr"):
                subs.append((item, reps))
    if eqn.primitive.name == "cond" and subs:  # branches: count the most expensive one
        return [max(subs, key=lambda s: _jaxpr_macs(s[0]))]
    return subs


def _jaxpr_macs(jaxpr: Any) -> int:
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr -> Jaxpr
    total = 0
    for eqn in jaxpr.eqns:
        total += _eqn_macs(eqn)
        for sub, reps in _sub_jaxprs(eqn):
            total += reps * _jaxpr_macs(sub)
    return total


def count_macs(fn: Callable[..., Any], *args: Any) -> int:
    """Multiply-accumulates of all matmuls/einsums (dot_general) and convolutions in `fn(*args)`.

    This is what fvcore/ptflops/thop report as "FLOPs" (one MAC = one "flop"); elementwise
    ops, norms and softmax are not counted. `args` may be `jax.ShapeDtypeStruct`s.
    """
    import jax

    return _jaxpr_macs(jax.make_jaxpr(fn)(*args))
