"""XLA:GPU's compiled train step for a GPU this machine does not have: kernels and memory (issue 8).

``python -m benchmarks.gpu_aot [--target h200|h100] [--config refcoco] [--dtype bfloat16]
[--batch 16] [--remat] [--variant NAME:KEY=VALUE[,...]] [--no-base] [--tag T]`` writes
``benchmarks/results/gpu_aot-<machine>-<target>-<dtype>-b<batch>[-remat][-T].json``; ``--quick`` =
the tiny synthetic:test model at batch 2 (the smoke test).

A deviceless compile: XLA's CUDA plugin builds the program for a GPU described by a target spec
(`benchmarks/gpu_specs/<target>.txtpb`, a `GpuTargetConfigProto`) with no GPU and no CUDA
driver, on the CPU. Each variant (`train_ab`'s ``NAME:KEY=VALUE`` config overrides; ``base``
first unless ``--no-base``) is the benchmark train step (`input_pipeline.train_step_setup`, the
decoder convolution as on a GPU) built, traced and lowered inside `compiling_for('gpu')`, so
every `auto` switch picks the GPU's form. Reported per variant:
- `kernels`: the kernels one step launches, i.e. the fusions and library calls (cuBLAS, cuDNN)
  of the entry computation and of the computations it calls (command buffers, loops and
  conditionals; a loop's body as many times as its known trip count), by kind
  (`kernel_counts`); `kernels_distinct` counts each loop body's kernels once. On the H200 the
  traced train step (bfloat16, batch 16, commit 911ae5c) ran 5917 kernels; a deviceless
  compile of the same program (2026-12-04) counted 5945;
- `memory`: XLA's own buffer assignment, arguments + outputs + temporaries − donated
  (`common.memory_of`): what the memory rows of `benchmarks.run` report on a GPU (26.7 GiB on
  the H200 for that step at an older commit, 24.3 GiB by this count);
- `io_bytes`: the bytes the kernels read and write, each kernel's operands and results once
  (`kernel_stats`), by kind in `io_bytes_by_kind`, and `io_ms`, the time moving them takes at
  the spec's `memory_bandwidth`: a floor for the memory-bound kernels' time, not a prediction
  (it ignores caches, partial and repeated reads);
- `top_io_kernels`: the `TOP_KERNELS` kernels that move the most bytes, each with its JAX
  source op (`op_name`), to find what a large kind is made of (`--dump-hlo DIR` also writes
  the optimized HLO);
- `kernels_by_scope`: kernel launches and I/O by forward / backward pass and model scope
  (`by_scope`; e.g. Swin's stage 3 or BERT's layers): what a compile spends its time on, as
  XLA's compile time grows with the kernel count (benchmarks/README.md, "Compile time");
- compile time and the HLO FLOP count.
What it cannot say is time: there is no device to run on, and XLA skips autotuning (GEMM tile
configurations come from its heuristics), so the GEMM kernels' split between cuBLAS and Triton
may differ from a real compile.

Needs XLA's CUDA plugin for this jaxlib, which is not a project dependency (about 180 MB):
``make gpu-aot-deps`` installs `jax-cuda12-pjrt` and `jax-cuda12-plugin` of jaxlib's version
into `.gpu-aot/` (no GPU or driver needed). The script then restarts itself with that folder on
`PYTHONPATH` and `JAX_PLATFORMS=cpu` (the plugin is only used to compile, never as a backend).
cuDNN fused attention (`model.swin.attention_impl=cudnn`) also needs cuDNN's libraries at
compile time, not a GPU: ``make gpu-aot-cudnn`` adds `nvidia-cudnn-cu12` (about 1.1 GB) there;
without it that variant fails with "cuDNN not found".
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_SITE = os.path.join(ROOT, ".gpu-aot", "site")
SPECS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs")
_RESTARTED = "VIPA_GPU_AOT_RESTARTED"

# `%name (p: f32[2]) -> f32[2] {` / `ENTRY %main.5 (...) -> (...) {` (no indentation)
_COMPUTATION = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$")
_OPCODE = re.compile(r"\s(?P<op>[a-z][a-z0-9\-]*)\(")
_CALLED = re.compile(r"\b(?:to_apply|body|condition|calls)=%?(?P<comp>[\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{(?P<comps>[^}]*)\}")
_NOT_KERNELS = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast",
                          "after-all", "partition-id", "replica-id", "opt-barrier"})
_CONTROL = frozenset({"call", "while", "conditional", "async-start"})
# Ops in a fused computation that void the one-read-per-written-element bound of an
# elementwise fusion: they read many elements per output, or run code not looked into here.
_MANY_TO_ONE = frozenset({"reduce", "reduce-window", "dot", "convolution", "scatter", "sort",
                          "select-and-scatter", "fusion", "custom-call", "call", "while"})


# A while loop's trip count in its backend_config: `"known_trip_count":{"n":"9"}`.
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"\}')
_SHAPE = re.compile(r"\b(?P<dtype>pred|[a-z]+\d+[a-z0-9]*)\[(?P<dims>[0-9,]*)\]")


# The scratch buffer cuBLAS / cuDNN calls return last: `(f32[8,8]{1,0}, s8[4194304]{0})`.
_SCRATCH = re.compile(r",\s*[su]8\[[0-9]*\]\{?[0-9,]*\}?\s*\)\s*$")


def _arrays(type_text: str) -> list[tuple[int, int]]:
    """(bytes per element, elements) of every array shape in an HLO type."""
    arrays = []
    for m in _SHAPE.finditer(type_text):
        dtype = m.group("dtype")
        bits = 8 if dtype == "pred" else int(re.match(r"[a-z]+(\d+)", dtype).group(1))
        n = 1
        for d in filter(None, m.group("dims").split(",")):
            n *= int(d)
        arrays.append((max(1, bits // 8), n))
    return arrays


def shape_bytes(type_text: str) -> int:
    """Bytes of every array shape in an HLO type ('f32[2,3]{1,0}' -> 24; a tuple: the sum)."""
    return sum(size * n for size, n in _arrays(type_text))


def _operands(call_text: str) -> list[str]:
    """Names of the operands in '%a, %b), kind=...' (the text after the opcode's '(')."""
    depth = 0
    for i, ch in enumerate(call_text):
        depth += ch == "("
        if ch == ")":
            if depth == 0:
                return re.findall(r"%([\w.\-]+)", call_text[:i])
            depth -= 1
    return re.findall(r"%([\w.\-]+)", call_text)


_OP_NAME = re.compile(r'\bop_name="(?P<op_name>[^"]*)"')


def kernel_list(hlo_text: str) -> list[dict[str, Any]]:
    """The kernels of an optimized XLA:GPU program, in launch order: per kernel its `name`,
    `kind` (the name without its number: 'loop_add_fusion.12' -> 'loop_add_fusion'; other ops
    as 'op:<opcode>'), `io_bytes` (its operands and results, every array counted once; a
    library call's scratch buffer is not a result), result `type` and the `op_name` of its
    metadata (the JAX source op, '' if none).

    Walks the entry computation and, through `call` (command buffers), `while`, `conditional`
    and `async-start`, the computations they run (each once); a fusion or custom call is one
    kernel, its own computation is not entered. A kernel inside a `while` loop with a known trip
    count (XLA's `known_trip_count`, e.g. a `lax.scan`) is listed once with `launches` = the
    trip count (nested loops multiply; 1 elsewhere); `by_kind` counts it that many times. The
    I/O bytes are the traffic each kernel would cause if it read its operands and wrote its
    results once: an operand it reads in part through a gather counts whole, and one it reads
    repeatedly (a GEMM's tiles) once; but a fusion operand that only static `slice`s read
    counts as those slices, an elementwise fusion (`loop_*`, no reduce, dot or such inside)
    reads at most one element of an operand per element it writes (a slice of a concatenation
    it fuses: the part it reads, not every part whole), a dynamic slice counts what it reads,
    and a dynamic-update-slice (in place) the update it reads and writes, not the whole buffer
    (a loop's stacked inputs and outputs).
    """
    comps: dict[str, list[tuple[str, str, str, str, str]]] = {}
    entry = current = None
    for line in hlo_text.splitlines():
        if not line[:1].isspace() and (m := _COMPUTATION.match(line)) is not None:
            current = m.group("name")
            comps[current] = []
            entry = current if m.group("entry") else entry
            continue
        if current is None or (m := _INSTRUCTION.match(line)) is None:
            continue
        rest, _, metadata = (" " + m.group("rest")).partition(" metadata=")
        op = _OPCODE.search(rest)
        out_type, args = (rest[:op.start()], rest[op.end():]) if op else (rest, "")
        op_name = _OP_NAME.search(metadata)
        trips = _TRIP_COUNT.search(m.group("rest"))
        comps[current].append((m.group("name"), op.group("op") if op else "", out_type, args,
                               op_name.group("op_name") if op_name else "",
                               int(trips.group("n")) if trips else 1))
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text")
    # (bytes per element, elements) of each instruction's arrays; names may repeat in
    # different computations
    arrays = {(comp, name): _arrays(out) for comp, insts in comps.items()
              for name, _, out, *_ in insts}
    kernels: list[dict[str, Any]] = []

    def walk(comp: str, launches: int = 1) -> None:
        for name, op, out, args, op_name, trips in comps.get(comp, ()):
            if op in _CONTROL:
                called = [m.group("comp") for m in _CALLED.finditer(args)]
                for m in _BRANCHES.finditer(args):
                    called += [c.strip().lstrip("%") for c in m.group("comps").split(",")]
                for c in called:
                    walk(c, launches * (trips if op == "while" else 1))
                continue
            if op in ("fusion", "custom-call"):
                kind = re.sub(r"(\.\d+)+$", "", name)
            elif op and op not in _NOT_KERNELS:
                kind = f"op:{op}"
            else:
                continue
            if op == "custom-call":  # a library call's last result may be its scratch space
                out = _SCRATCH.sub(")", out)
            names = _operands(args)
            operands = [sum(size * n for size, n in arrays.get((comp, a), ())) for a in names]
            called = _CALLED.search(args) if op == "fusion" else None
            fused = comps.get(called.group("comp"), []) if called else []
            for i, nbytes in _sliced_reads(fused).items():
                if i < len(operands):
                    operands[i] = min(operands[i], nbytes)
            if kind.startswith("loop_") and fused and not any(
                    inst[1] in _MANY_TO_ONE for inst in fused):
                # an elementwise (loop) fusion reads at most one element of an operand per
                # element it writes: a slice of a concatenation it fuses, not every part whole
                written = sum(n for _, n in _arrays(out))
                for i, a in enumerate(names):
                    if len(operand := arrays.get((comp, a), ())) == 1:
                        operands[i] = min(operands[i], written * operand[0][0])
            if "dynamic_update_slice" in kind or op == "dynamic-update-slice":
                # in place: the buffer (the operand the size of the result) is neither read nor
                # written whole; the update is read and written into it
                result = shape_bytes(out)
                io = 2 * sum(b for b in operands if b != result)
            elif "dynamic_slice" in kind or op == "dynamic-slice":
                io = 2 * shape_bytes(out)  # reads the slice it writes (a scan's stacked input)
            else:
                io = shape_bytes(out) + sum(operands)
            kernels.append({"name": name, "kind": kind, "io_bytes": io,
                            "type": out.strip(), "op_name": op_name, "launches": launches})

    walk(entry)
    return kernels


def _sliced_reads(insts: list[tuple[Any, ...]]) -> dict[int, int]:
    """For a fused computation's instructions: {parameter index: bytes read} for each parameter
    that only `slice` instructions use (the fusion reads those slices, not the whole operand)."""
    params = {name: int(m.group(1)) for name, op, _, args, *_ in insts
              if op == "parameter" and (m := re.match(r"\s*(\d+)\)", args))}
    users: dict[str, list[tuple[str, str]]] = {name: [] for name in params}
    for _, op, out, args, *_ in insts:
        for a in set(_operands(args)):
            if a in users:
                users[a].append((op, out))
    return {params[name]: sum(shape_bytes(out) for _, out in used)
            for name, used in users.items() if used and all(op == "slice" for op, _ in used)}


def _summed(kernels: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any],
            ) -> tuple[collections.Counter[Any], collections.Counter[Any]]:
    """A `kernel_list` summed by `key(kernel)` over the launches of one step: (kernel
    launches, I/O bytes)."""
    counts: collections.Counter[Any] = collections.Counter()
    io: collections.Counter[Any] = collections.Counter()
    for k in kernels:
        counts[key(k)] += k["launches"]
        io[key(k)] += k["io_bytes"] * k["launches"]
    return counts, io


def by_kind(
    kernels: list[dict[str, Any]],
) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """A `kernel_list` summed by kind over the launches of one step: (kernel launches, I/O
    bytes)."""
    return _summed(kernels, lambda k: k["kind"])


SCOPE_DEPTH = 3  # named scopes kept by `source_scope`: 'encoder/backbone.run_stage/layers_2'


def source_scope(op_name: str, depth: int = SCOPE_DEPTH) -> tuple[str, str]:
    """A kernel's JAX source op -> (pass, scope): pass 'forward' (`jvp(...)`), 'backward'
    (`transpose(jvp(...))`) or '' (neither: the optimizer, the loss's outer ops); scope the
    first `depth` named scopes of the model under it, without `jit(...)` wrappers, or
    '(step) <op>' for an op outside the model ('(none)' for a kernel without metadata)."""
    parts = op_name.split("/")
    if not op_name or not parts[0].startswith("jit("):
        return "", "(none)"  # a parameter's name or no metadata
    parts, direction = parts[1:], ""
    if parts and parts[0].startswith("transpose(jvp("):
        parts, direction = parts[1:], "backward"
    elif parts and parts[0].startswith("jvp("):
        parts, direction = parts[1:], "forward"
    named = [q for q in parts[:-1] if "(" not in q]
    return direction, "/".join(named[:depth]) if named else f"(step) {parts[-1] if parts else ''}"


def by_scope(kernels: list[dict[str, Any]], depth: int = SCOPE_DEPTH) -> list[dict[str, Any]]:
    """A `kernel_list` summed by (`source_scope`) pass and scope over one step's launches,
    most launches first: where the program's kernels, and so its compile time, come from."""
    counts, io = _summed(kernels, lambda k: source_scope(k["op_name"], depth))
    return [{"pass": d, "scope": sc, "kernels": n, "io_bytes": io[(d, sc)]}
            for (d, sc), n in counts.most_common()]


def kernel_stats(hlo_text: str) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """The program's kernels summed by kind: (kernel counts, I/O bytes)."""
    return by_kind(kernel_list(hlo_text))


def kernel_counts(hlo_text: str) -> collections.Counter[str]:
    """`kernel_stats`' kernel counts by kind."""
    return kernel_stats(hlo_text)[0]


# Kernel kinds grouped for the table: (group, regex on the kind).
KERNEL_GROUPS = (
    ("gemm", r"^(custom-call|cublas|gemm_fusion|triton_gemm|cudnn)"),
    ("attention", r"^dot_product_attention"),  # cuDNN fused attention (fmha custom calls)
    ("softmax", r"softmax"),
    ("reduce", r"reduce"),
    ("transpose", r"transpose"),
    ("select", r"select"),
)


def group_counts(counts: collections.Counter[str]) -> dict[str, int]:
    """Kernel counts per `KERNEL_GROUPS` group (first match wins) and 'other'."""
    out = dict.fromkeys([g for g, _ in KERNEL_GROUPS] + ["other"], 0)
    for kind, n in counts.items():
        group = next((g for g, rx in KERNEL_GROUPS if re.search(rx, kind)), "other")
        out[group] += n
    return out


def plugin_importable() -> bool:
    """Whether XLA's CUDA plugin (`jax_plugins.xla_cuda12`) can be imported here."""
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no `jax_plugins` namespace at all
        return False


def ensure_plugin(argv: list[str]) -> None:
    """Make XLA's CUDA plugin importable: restart with `PLUGIN_SITE` on PYTHONPATH, or explain."""
    if plugin_importable():
        return
    if os.path.isdir(PLUGIN_SITE) and not os.environ.get(_RESTARTED):
        env = dict(os.environ, JAX_PLATFORMS="cpu", **{_RESTARTED: "1"})
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PLUGIN_SITE, env.get("PYTHONPATH")) if p)
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.gpu_aot", *argv], env)
    raise SystemExit(
        "benchmarks.gpu_aot needs XLA's CUDA plugin for this jaxlib (jax-cuda12-pjrt and "
        f"jax-cuda12-plugin); `make gpu-aot-deps` installs them into {PLUGIN_SITE}")


def _plugin_version() -> str | None:
    """The installed jax-cuda12-plugin's version (None if its metadata cannot be read)."""
    from importlib import metadata

    try:
        return metadata.version("jax-cuda12-plugin")
    except metadata.PackageNotFoundError:
        return None


def read_spec(target: str) -> str:
    """The text of `benchmarks/gpu_specs/<target>.txtpb`; a clear error naming the known ones."""
    path = os.path.join(SPECS_DIR, f"{target}.txtpb")
    if not os.path.isfile(path):
        known = sorted(f[:-6] for f in os.listdir(SPECS_DIR) if f.endswith(".txtpb"))
        raise SystemExit(f"no GPU spec {path}; known targets: {known}")
    with open(path) as f:
        return f.read()


def spec_bandwidth(spec: str) -> float | None:
    """The spec's `memory_bandwidth` (bytes/s), None if it has none."""
    m = re.search(r"^\s*memory_bandwidth:\s*([0-9.eE+]+)\s*$", spec, re.M)
    return float(m.group(1)) if m else None


def gpu_device(target: str) -> Any:
    """A compile-only device of the GPU described by `benchmarks/gpu_specs/<target>.txtpb`."""
    from jax.experimental import topologies

    return topologies.get_topology_desc("", "cuda", topology="1x1x1",
                                        target_config=read_spec(target)).devices[0]


TOP_KERNELS = 25  # the kernels with the most I/O, listed per variant
TOP_SCOPES = 40  # the source scopes with the most kernel launches, listed per variant


def compile_variant(cfg: Any, batch: int, device: Any, bandwidth: float | None = None,
                    hlo_path: str | None = None) -> dict[str, Any]:
    """Deviceless compile of the benchmark train step for `cfg` -> kernels, their I/O bytes
    (and what moving those takes at `bandwidth` bytes/s), the `TOP_KERNELS` kernels that move
    the most, memory, timings. `hlo_path`: write the optimized HLO text there."""
    import jax
    from jax.sharding import SingleDeviceSharding

    from benchmarks.input_pipeline import train_step_setup
    from vipa_jax.backend import compiling_for
    from vipa_jax.train.step import SplitTrainStep, step_compiler_options

    sharding = SingleDeviceSharding(device)

    def abstract(tree: Any) -> Any:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            tree)

    split = bool(cfg.train.get("split_update", False))
    with compiling_for("gpu"):
        step, state, data = train_step_setup(cfg, batch, split=split)
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding)
        if split:  # `train.split_update`: two programs, compiled at once as train.py does
            step = SplitTrainStep(step, jax.tree.map(lambda _: sharding, state), sharding,
                                  sharding, compiler_options=step_compiler_options(cfg))
        compiled, info = common.compile_jax(step, abstract(state), abstract(data), key,
                                            donate_argnums=(0,),
                                            compiler_options=step_compiler_options(cfg))
    hlo = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(hlo)
    kernels = [k for part in getattr(compiled, "parts", (compiled,))  # each program's own
               for k in kernel_list(part.as_text())]  # parsed once: the sums and the top list
    counts, io = by_kind(kernels)
    memory = common.memory_of(compiled)
    io_bytes = sum(io.values())
    top = sorted(kernels, key=lambda k: -k["io_bytes"])[:TOP_KERNELS]

    def io_ms(nbytes: int) -> float | None:  # moving `nbytes` at the spec's bandwidth
        return nbytes / bandwidth * 1e3 if bandwidth else None

    return {
        "compile_s": info["compile_s"], "lower_s": info["lower_s"],
        "program_compile_s": info.get("program_compile_s"),
        "hlo_flops": info["hlo_flops"], "hlo_flops_source": info["hlo_flops_source"],
        "kernels": sum(counts.values()), "kernels_distinct": len(kernels),
        "kernel_groups": group_counts(counts),
        "kernels_by_kind": dict(counts.most_common()),
        "io_bytes": io_bytes, "io_ms": io_ms(io_bytes),
        "io_bytes_by_kind": dict(io.most_common()),
        "top_io_kernels": [{**k, "io_ms": io_ms(k["io_bytes"])} for k in top],
        "kernels_by_scope": by_scope(kernels)[:TOP_SCOPES],
        "memory": memory,
        "memory_gib": memory["estimate_bytes"] / 2**30 if memory else None,
    }


def run(
    variants: list[tuple[str, dict[str, Any]]], *, target: str = "h200",
    config: str = "refcoco", quick: bool = False, dtype: str = "bfloat16",
    batch: int | None = None, remat: bool = False, out_dir: str | None = None,
    write: bool = True, tag: str = "", dump_hlo: str | None = None,
) -> dict[str, Any]:
    from benchmarks.train_ab import variant_configs

    started = common.machine_info()  # the commit the programs are built from, not a later one
    batch = batch or (2 if quick else 16)
    cfgs = variant_configs(variants, config, quick, dtype, remat)  # errors first
    device = gpu_device(target)
    bandwidth = spec_bandwidth(read_spec(target))
    name = "synthetic:test" if quick else config
    print(f"deviceless XLA:GPU compile for {device.device_kind} ({target}): {name}, batch "
          f"{batch}, {dtype}, remat {remat}; variants {[n for n, _ in variants]}", flush=True)
    entries: dict[str, dict[str, Any]] = {}
    for (vname, overrides), cfg in zip(variants, cfgs.values(), strict=True):  # names differ
        entries[vname] = {"overrides": overrides}
        try:
            hlo_path = os.path.join(dump_hlo, f"{vname}.hlo.txt") if dump_hlo else None
            entries[vname].update(compile_variant(cfg, batch, device, bandwidth, hlo_path))
        except Exception as e:  # noqa: BLE001 - record why and go on to the next variant
            entries[vname]["error"] = f"{type(e).__name__}: {str(e)[:500]}" + (
                " (`make gpu-aot-cudnn` installs cuDNN for deviceless compiles)"
                if "cuDNN not found" in str(e) else "")
        e = entries[vname]
        print(f"  {vname}: " + (e["error"][:200] if "error" in e else
                                f"{e['kernels']} kernels, {e['io_bytes'] / 1e9:.1f} GB of "
                                f"kernel I/O, XLA memory {e['memory_gib']:.2f} GiB, "
                                f"compile {e['compile_s']:.0f} s"), flush=True)
    first = next((n for n, e in entries.items() if "kernels" in e), None)
    groups = [g for g, _ in KERNEL_GROUPS] + ["other"]
    rows = []
    for vname, e in entries.items():
        if "kernels" not in e:
            rows.append([vname, None, None, *([None] * len(groups)), None, None, None,
                         e["error"][:60]])
            continue
        delta = e["kernels"] - entries[first]["kernels"]
        rows.append([vname, e["kernels"], delta, *(e["kernel_groups"][g] for g in groups),
                     e["io_bytes"] / 1e9, e["io_ms"], e["memory_gib"], ""])
    common.print_table(rows, ["variant", "kernels", f"vs {first}", *groups, "I/O GB", "I/O ms",
                              "XLA GiB", "error"])
    result: dict[str, Any] = {
        "machine_info": started, "target": target, "device_kind": device.device_kind,
        "plugin": _plugin_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "memory_bandwidth": bandwidth,
        "config": name, "quick": quick, "batch": batch, "dtype": dtype, "remat": remat,
        "reference": first,
        "variants": entries,
    }
    if write:
        name_tag = f"{target}-{dtype}-b{batch}" + ("-remat" if remat else "") + (
            f"-{tag}" if tag else "")
        result["path"] = common.write_result("gpu_aot", result, out_dir, tag=name_tag)
        print("wrote", result["path"])
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="h200", help="a spec in benchmarks/gpu_specs/")
    p.add_argument("--config", choices=("refcoco", "synthetic"), default="refcoco")
    p.add_argument("--quick", action="store_true", help="the tiny synthetic:test model")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--batch", type=int, default=None, help="default 16 (quick: 2)")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,...]")
    p.add_argument("--no-base", action="store_true", help="only the --variant ones")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--tag", default="", help="appended to the result's file name")
    p.add_argument("--dump-hlo", default=None, metavar="DIR",
                   help="write each variant's optimized HLO text to DIR/<variant>.hlo.txt")
    a = p.parse_args(argv)
    if a.dump_hlo:
        os.makedirs(a.dump_hlo, exist_ok=True)
    from benchmarks.train_ab import cli_variants

    try:
        variants = cli_variants(a.no_base, a.variant)
    except ValueError as err:
        p.error(str(err))
    ensure_plugin(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the plugin compiles; it is no backend here
    return run(variants, target=a.target, config=a.config, quick=a.quick, dtype=a.dtype,
               batch=a.batch, remat=a.remat, out_dir=a.out, tag=a.tag, dump_hlo=a.dump_hlo)


if __name__ == "__main__":
    main()
