"""Where the time goes: a `jax.profiler` trace of the VIPA forward (or train step), per module.

``python -m benchmarks.profile [--config refcoco|synthetic] [--quick] [--train] [--dtype D]
[--batch N] [--part P] [--reps 3] [--depth 2] [--trace-dir DIR]`` prints three tables and writes
``benchmarks/results/profile-<machine>-<gpu or CPU ISA>-<config>[-<part>]-<infer|train>-<dtype>``
``.json``.
``--part`` (inference, batch 1) traces one part of the forward on its own, as
`benchmarks.model` splits it: ``swin``, ``bert``, ``encoder``, ``advanced_lang``, ``veg``,
``decoder`` (default ``total``, the whole forward; only that one goes into RESULTS.md).
The tables:

- by module: the time of every XLA op, summed over the flax module path that produced it (the
  op's `op_name` metadata, e.g. ``encoder/backbone.run_stage/layers_2/blocks_3/attn/...``), cut
  to ``--depth`` levels below the model. In a train step the backward ops are their own groups
  (``bwd: ...``) and ops outside the model (loss, optimizer) are grouped by their first name.
- by op kind: the same time summed by XLA op kind (``ynn_fusion`` = a GEMM/conv library call on
  CPU, ``*copy*``/``*transpose*`` = layout copies, ...): what to look at before optimizing.
- top ops: the slowest single ops with their shapes and full module paths.

Method: the function is jitted, compiled and run twice untraced (the train step as
`benchmarks.run` times it: the state donated, each call fed the state the last one returned);
then ``--reps`` calls run under
`jax.profiler.trace` and the trace (`*.xplane.pb`, readable by TensorBoard / XProf / Perfetto;
kept with ``--trace-dir``) is read back with `jax.profiler.ProfileData`. An event counts when its
`hlo_op` stat or its name (a GPU kernel is named after its instruction with `.` -> `_`) is an
instruction of the compiled HLO; on a GPU only the device planes count (the host's launch events
would count the same op twice), and device time that matches no instruction is reported as
``unattributed_device_ms`` with its largest events. On a GPU XLA's command buffers are turned off
(`--keep-command-buffers` keeps them): kernels replayed from a CUDA graph carry no instruction.
On CPU XLA may run independent ops concurrently, so the op times can add up to more than the
wall time (both are reported).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

from benchmarks import common
from benchmarks.model import FORWARD_PARTS

# `%name = f32[1,2]{1,0} opcode(...), ..., metadata={op_name="jit(f)/VIPA/encoder/..."`
_HLO_LINE = re.compile(r'^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>\S+)\s')
_OP_NAME = re.compile(r'metadata=\{[^}]*?op_name="(?P<op>[^"]*)"')
_CALLS = re.compile(r"\bcalls=%?(?P<comp>[\w.\-]+)")
# `%fused_transpose.41 (param_0: f32[..]) -> f32[..] {` / `ENTRY %main.5 (...) -> ... {`
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<comp>[\w.\-]+)\s.*\{\s*$")
NO_METADATA = "(no metadata)"
_TRANSFORM = re.compile(r"^(?:jit|pjit|jvp|transpose|vmap|remat|checkpoint|custom_jvp_call|"
                        r"custom_vjp_call|rematted_computation)\((?P<inner>.*)\)$")


def hlo_op_names(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{HLO instruction name: (result shape, op_name metadata)} from compiled HLO text.

    An instruction without metadata (XLA's own, e.g. a layout transpose fusion) takes that of
    the computation it calls (a fusion's root, else its first instruction that has one), else
    is named `NO_METADATA`: its time still counts, under that name.
    """
    found: dict[str, tuple[str, str | None, str | None]] = {}  # name: (shape, op, called)
    comp_op: dict[str, str] = {}  # computation: op_name of its root / first instruction
    comp = None
    for line in hlo_text.splitlines():
        if (c := _COMPUTATION.match(line)) is not None and "=" not in line.split("{")[0]:
            comp = c.group("comp")
            continue
        m = _HLO_LINE.match(line)
        if not m:
            continue
        op = _OP_NAME.search(line)
        op = op.group("op") if op else None
        calls = _CALLS.search(line)
        found[m.group("name")] = (m.group("shape"), op, calls.group("comp") if calls else None)
        if comp is not None and op and (comp not in comp_op or line.lstrip().startswith("ROOT")):
            comp_op[comp] = op
    return {name: (shape, op or comp_op.get(called or "", NO_METADATA))
            for name, (shape, op, called) in found.items()}


def module_group(op_name: str, depth: int) -> str:
    """'jit(step)/transpose(jvp(VIPA))/encoder/backbone.run_stage/layers_0/...' -> 'bwd: encoder/
    backbone.run_stage' at depth 2.

    `jit(...)` parts (the jitted function, inlined helpers) are dropped, other transform wrappers
    (`jvp`, `transpose`, `remat`, ...) are peeled, a `transpose(...)` marks the op as backward,
    and a leading CamelCase part (the root flax module, e.g. `VIPA`) is dropped.
    """
    backward = False
    parts = []
    for part in op_name.split("/"):
        if part.startswith(("jit(", "pjit(")):
            continue
        while (m := _TRANSFORM.match(part)) is not None:
            backward |= part.startswith("transpose(")
            part = m.group("inner")
        if part:
            parts.append(part)
    if parts and parts[0][:1].isupper():
        parts = parts[1:]
    group = "/".join(parts[:depth]) or "(top level)"
    return f"bwd: {group}" if backward else group


def op_kind(name: str) -> str:
    """XLA instruction name -> its kind: 'ynn_fusion.42' -> 'ynn_fusion'."""
    return re.sub(r"(\.\d+)+$", "", name)


def _sanitized(name: str) -> str:
    """A GPU kernel name from its instruction's: 'loop_add_fusion.12' -> 'loop_add_fusion_12'."""
    return re.sub(r"\W", "_", name)


_ANNOTATION_OP = re.compile(r"hlo_op=([^,#]+)")


def _event_op(ev: Any) -> str:
    """The HLO instruction a trace event ran: its `hlo_op` stat, or the `hlo_op=` field of its
    kernel `annotation` (`name:#hlo_op=fusion.3,hlo_module=...#`; a GPU kernel event is named
    after the kernel, e.g. a cuBLAS or cuDNN one), else its name (XLA:CPU names thunks after
    the instruction)."""
    annotation = None
    for key, value in ev.stats:
        if key == "hlo_op":
            return str(value).lstrip("%")
        if key == "annotation":
            annotation = _ANNOTATION_OP.search(str(value))
    return (annotation.group(1) if annotation else ev.name).lstrip("%")


def trace_op_times(
    call: Callable[[], Any], hlo_text: str, reps: int, trace_dir: str | None = None,
) -> dict[str, Any]:
    """Run `call()` (one call of the compiled program whose HLO is `hlo_text`) `reps` times
    under the profiler -> per-instruction mean ns per call.

    Returns {"ops": {name: {"ns": float, "count": int, "shape": str, "op_name": str}},
    "planes": [names of the planes that counted], "trace": path of the .xplane.pb}.
    """
    import jax

    names = hlo_op_names(hlo_text)
    alias = {_sanitized(n): n for n in names}
    trace_dir = trace_dir or tempfile.mkdtemp(prefix="vipa_trace_")
    with jax.profiler.trace(trace_dir):
        for _ in range(reps):
            jax.block_until_ready(call())
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        raise RuntimeError(f"the profiler wrote no *.xplane.pb under {trace_dir}")
    data = jax.profiler.ProfileData.from_file(files[-1])
    per_plane: dict[str, collections.Counter[str]] = {}
    counts: dict[str, collections.Counter[str]] = {}
    missed: dict[str, collections.Counter[str]] = {}  # device events matching no instruction
    for plane in data.planes:
        total: collections.Counter[str] = collections.Counter()
        count: collections.Counter[str] = collections.Counter()
        miss: collections.Counter[str] = collections.Counter()
        for line in plane.lines:
            for ev in line.events:
                name = _event_op(ev)
                name = name if name in names else alias.get(_sanitized(name), name)
                if name in names:
                    total[name] += ev.duration_ns
                    count[name] += 1
                elif not line.name.startswith(("XLA Modules", "XLA Ops", "Steps")):
                    miss[f"{line.name}: {ev.name}"] += ev.duration_ns
        if total:
            per_plane[plane.name], counts[plane.name] = total, count
        missed[plane.name] = miss
    device_planes = [p for p in per_plane if p.startswith("/device:") and "CPU" not in p]
    use = device_planes or list(per_plane)
    unattributed: collections.Counter[str] = collections.Counter()
    for p in device_planes:  # on a CPU the host plane is mostly Python, not kernels
        unattributed.update(missed[p])
    ops: dict[str, dict[str, Any]] = {}
    for p in use:
        for name, ns in per_plane[p].items():
            shape, op = names[name]
            e = ops.setdefault(name, {"ns": 0.0, "count": 0, "shape": shape, "op_name": op})
            e["ns"] += ns / reps
            e["count"] += counts[p][name]
    return {"ops": ops, "planes": use, "trace": files[-1],
            "unattributed_ms": sum(unattributed.values()) / reps / 1e6,
            "unattributed_top": [{"event": k, "ms": v / reps / 1e6}
                                 for k, v in unattributed.most_common(20)]}


TOP_OPS_KEPT = 100  # slowest single ops kept in the JSON


def summarize_ops(ops: dict[str, dict[str, Any]], depth: int) -> dict[str, Any]:
    """Per-module and per-kind sums (ms per call) and the op list sorted by time."""
    by_module: dict[str, dict[str, float]] = {}
    by_kind: dict[str, dict[str, float]] = {}
    for name, e in ops.items():
        for table, key in ((by_module, module_group(e["op_name"], depth)),
                           (by_kind, op_kind(name))):
            row = table.setdefault(key, {"ms": 0.0, "ops": 0})
            row["ms"] += e["ns"] / 1e6
            row["ops"] += 1
    total = sum(e["ns"] for e in ops.values()) / 1e6

    def ranked(table: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
        rows = sorted(table.items(), key=lambda kv: -kv[1]["ms"])
        return [{"name": k, "ms": v["ms"], "percent": 100 * v["ms"] / total if total else 0.0,
                 "ops": int(v["ops"])} for k, v in rows]

    top = sorted(ops.items(), key=lambda kv: -kv[1]["ns"])[:TOP_OPS_KEPT]
    return {
        "op_time_ms": total,
        "ops_traced": len(ops),
        "by_module": ranked(by_module),
        "by_kind": ranked(by_kind),
        "top_ops": [{"name": n, "ms": e["ns"] / 1e6, "shape": e["shape"],
                     "module": module_group(e["op_name"], 99)} for n, e in top],
    }


def profile(
    cfg: Any, *, train: bool, batch: int, reps: int, depth: int, trace_dir: str | None = None,
    part: str = "total",
) -> dict[str, Any]:
    """Compile the forward (or train step, or one `part` of the forward), time it, trace it ->
    the JSON result (no machine)."""
    if part != "total" and (train or batch != 1):
        raise ValueError(f"--part {part} profiles the inference forward at batch 1 only "
                         "(no --train, --batch 1)")
    if train:
        from benchmarks.input_pipeline import compile_train_step

        # The program `benchmarks.run` times: the state donated (updated in place on a GPU),
        # so each call feeds the state the previous one returned.
        call, compiled, info = compile_train_step(cfg, batch)
    else:
        from benchmarks.input_pipeline import forward_setup
        from benchmarks.model import part_setup

        fn, args = forward_setup(cfg, batch) if part == "total" else part_setup(cfg.model, part)
        compiled, info = common.compile_jax(fn, *args)
        call = lambda: compiled(*args)  # noqa: E731
    timing = common.time_call(call, iters=max(reps, 2), warmup=1)
    traced = trace_op_times(call, compiled.as_text(), reps, trace_dir)
    summary = summarize_ops(traced["ops"], depth)
    return {
        "mode": "train" if train else "inference", "part": part, "batch": batch,
        "image_size": cfg.model.image_size, "tokens": cfg.model.max_tokens,
        "dtype": cfg.model.dtype, "remat": bool(cfg.model.remat), "reps": reps, "depth": depth,
        "compile_s": info["lower_s"] + info["compile_s"], "xla_flops": info["flops"],
        "hlo_flops": info["hlo_flops"], "hlo_flops_source": info["hlo_flops_source"],
        "wall_median_ms": timing["median_s"] * 1e3, "wall_min_ms": timing["min_s"] * 1e3,
        "planes": traced["planes"], "trace_file": traced["trace"] if trace_dir else None,
        "unattributed_device_ms": traced["unattributed_ms"],
        "unattributed_top": traced["unattributed_top"],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **summary,
    }


def print_profile(r: dict[str, Any], top: int) -> None:
    part = "" if r.get("part", "total") == "total" else f" ({r['part']} only)"
    print(f"{r['mode']}{part}, batch {r['batch']}, {r['image_size']}x{r['image_size']}, "
          f"{r['dtype']}{', remat' if r['remat'] else ''}: wall median "
          f"{r['wall_median_ms']:.1f} ms; traced op time {r['op_time_ms']:.1f} ms per call "
          f"({r['ops_traced']} ops; planes: {', '.join(r['planes'])})")
    if r.get("unattributed_device_ms"):
        print(f"device time matched to no HLO instruction: {r['unattributed_device_ms']:.2f} ms "
              "per call; largest:", ", ".join(f"{u['event']} ({u['ms']:.3f} ms)"
                                             for u in r["unattributed_top"][:5]))
    flops = r.get("hlo_flops") or r.get("xla_flops")
    if flops:
        source = {"jaxpr_macs": "2 x the jaxpr's multiply-adds",
                  "hlo": "XLA count before optimization"}.get(
            r.get("hlo_flops_source", "hlo") if r.get("hlo_flops") else "",
            "XLA count after optimization")
        print(f"{flops / 1e12:.2f} TFLOPs per call ({source}): "
              f"{flops / r['wall_median_ms'] / 1e9:.1f} TFLOP/s at the wall median")
    for title, key in (("by module", "by_module"), ("by op kind", "by_kind")):
        rows = [[x["name"], f"{x['ms']:.2f}", f"{x['percent']:.1f}", x["ops"]]
                for x in r[key][:top]]
        common.print_table(rows, [title, "ms/call", "%", "ops"])
    rows = [[x["name"], f"{x['ms']:.2f}", x["shape"][:40], x["module"][-80:]]
            for x in r["top_ops"][:top]]
    common.print_table(rows, ["op", "ms/call", "shape", "module"], title="top ops")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=("refcoco", "synthetic"), default="refcoco")
    p.add_argument("--quick", action="store_true", help="the tiny synthetic:test model")
    p.add_argument("--train", action="store_true", help="profile the train step, not the forward")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--part", default="total", choices=FORWARD_PARTS,
                   help="one part of the inference forward at batch 1 (benchmarks.model's split)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--reps", type=int, default=3, help="traced calls (times are per call)")
    p.add_argument("--depth", type=int, default=2, help="module path levels per group")
    p.add_argument("--top", type=int, default=25, help="rows per printed table")
    p.add_argument("--trace-dir", default=None, help="keep the trace here (TensorBoard/XProf)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--keep-command-buffers", action="store_true",
                   help="GPU: keep XLA's command buffers (CUDA graphs); by default they are off "
                        "so that each kernel carries its HLO instruction in the trace")
    a = p.parse_args(argv)
    if a.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"  # before jax is imported
    elif not a.keep_command_buffers:
        # Kernels replayed from a CUDA graph carry no HLO annotation: on an H200 (jax 0.11.2)
        # only the cuDNN / cuBLAS calls outside the graphs, 6% of the forward's time, were
        # attributed with them on. Harmless on a CPU (the flag is XLA:GPU's).
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_gpu_enable_command_buffer=").strip()
    import jax

    from benchmarks.run import load_config

    cfg = load_config(a.config, a.quick)
    cfg.model.dtype, cfg.model.remat = a.dtype, a.remat
    if a.image_size:
        cfg.model.image_size = a.image_size
    t0 = time.perf_counter()
    try:
        r = profile(cfg, train=a.train, batch=a.batch, reps=a.reps, depth=a.depth,
                    trace_dir=a.trace_dir, part=a.part)
    except common.CompiledOnly as done:  # $VIPA_BENCH_COMPILE_ONLY: the program is cached
        return {"compiled_only": done.args[0]}
    r.update(quick=a.quick, config="synthetic:test" if a.quick else a.config,
             backend=jax.default_backend(),
             device_kind=jax.devices()[0].device_kind, total_s=time.perf_counter() - t0,
             load=common.load_snapshot())
    print_profile(r, a.top)
    where = common.device_tag(r["backend"], r["device_kind"])
    part = "" if a.part == "total" else f"-{a.part}"
    tag = f"{r['config'].replace(':', '_')}{part}-{'train' if a.train else 'infer'}-{a.dtype}"
    r["path"] = common.write_result("profile", r, a.out, tag=f"{where}-{tag}")
    print("wrote", r["path"])
    return r


if __name__ == "__main__":
    main()
