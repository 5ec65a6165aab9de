"""``benchmark compile``: the train and eval steps compiled ahead of time for a topology.

    python -m transkd_jax.benchmark compile --config=configs/cityscapes.py --topology=v5e:2x2

Builds the configured run (``build.training(weights=False)``: nothing is read
and nothing runs) over a mesh of the topology's devices, lowers the train step
on abstract arguments (``build.batch_spec``) and compiles it, and the eval step
with it. ``--topology`` is anything ``jax.experimental.topologies.get_topology_desc``
accepts for TPUs (``v5e:2x2``, ``v5e:4x4``, ``v4:2x2x2``, ``v5p:2x2x2``,
``v6e:2x2`` ...; multi-host slices too), compiled here with libtpu and no TPU,
NVIDIA GPUs (``a100``, ``h100``, ``h200``, or ``h100:8`` for eight of one host; ``GPUS``),
compiled here with JAX's CUDA plugin and no GPU (no autotuning, and XLA:GPU counts no
FLOPs or bytes: the FLOPs are the native step's lowered for the CPU, and only the bound
on the shapes' bytes is given), or ``local`` for this process's devices (a GPU machine,
or the CPU).

One JSON line: the compile time; per-device memory (arguments + outputs +
temporaries - aliased) against the chip's HBM; XLA's FLOP count; every
collective (count and bytes by kind); the kernel form each swappable op
compiled to; and a roofline estimate from the chip's peak bfloat16 FLOP/s and
HBM bandwidth. Where the bytes go: ``hbm_bytes_per_image`` (XLA's bytes accessed per
image) and ``top_traffic``, the ten fusions or ops that move the most bytes (``traffic``:
operands plus result, from the shapes), each with its FLOPs and the Flax module it comes
from (the HLO's op_name metadata); and ``traffic_by_part``, every op's bytes summed by
the part of the model it comes from (a stage's attention or MLP, the head, a distillation
module), with ``traffic_gib_from_shapes`` their sum beside XLA's own count. On a TPU
whose clock is known, ``est_step_ms_compiler`` and ``time_by_part``: XLA:TPU's own
per-op cycle estimates, summed (not a bound: the compiler's cost model, the Pallas
kernels and asynchronous copies left out).
``--per_device_batch_sizes=2,4,8`` prints one such line per per-device batch, so the
largest that fits shows. The two roofline estimates are bounds (the step takes at least
that long), not predictions. A step that does not fit exits 1 with one line saying by how much and
what to change.
"""

import re
import time
from typing import NamedTuple, Optional

import jax
from jax.experimental import topologies

from transkd_jax import build
from transkd_jax.errors import UserError
from transkd_jax.throughput import Chip, chip_of

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = (.*?) ([a-z][a-z0-9\-]*)\(")
_FUSED_REDUCE_SCATTER = re.compile(r"^%all-reduce-scatter[\w.]* \(")
_ARRAY = re.compile(r"\b(pred|[suf](?:8|16|32|64)|bf16|c64|c128)\[([\d,]*)\]")
_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "f8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}


class Gpu(NamedTuple):
  """What XLA:GPU is told of a GPU (its GpuTargetConfig), from the published figures."""

  kind: str  # the device kind JAX reports
  capability: tuple  # CUDA compute capability
  sms: int
  fp32_units_per_sm: int
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int
  l2_bytes: int
  hbm_bytes_per_s: float
  sm_clock_ghz: float
  hbm_bytes: int


# NVIDIA GPUs to compile for without one (``--topology=h100`` or ``h100:8``, GPUs of one
# host). Such a compile runs no autotuning, so XLA picks its kernels by its defaults.
GPUS = {
  "a100": Gpu(
    "NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 167936, 166912, 40 << 20, 2039e9, 1.41, 80 << 30
  ),
  "h100": Gpu(
    "NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 233472, 232448, 50 << 20, 3352e9, 1.98, 80 << 30
  ),
  "h200": Gpu("NVIDIA H200", (9, 0), 132, 128, 233472, 232448, 60 << 20, 4800e9, 1.98, 141 << 30),
}


def gpu_target_config(name: str) -> str:
  """XLA:GPU's GpuTargetConfig (text format) for one of ``GPUS``."""
  g = GPUS[name]
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {g.shared_memory_per_sm} threads_per_core_limit: 2048
  core_count: {g.sms} fpus_per_core: {g.fp32_units_per_sm}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(g.hbm_bytes_per_s)} l2_cache_size: {g.l2_bytes}
  clock_rate_ghz: {g.sm_clock_ghz} device_memory_size: {g.hbm_bytes}
  shared_memory_per_block_optin: {g.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {g.capability[0]} minor: {g.capability[1]} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{g.kind}"
"""


def _gpu_devices(name: str):
  gpu, colon, count = name.lower().partition(":")
  count = count if colon else "1"
  if not count.isdigit() or int(count) < 1:
    raise UserError(f"--topology={name}: expected {gpu} or {gpu}:N, N GPUs of one host")
  try:
    return topologies.get_topology_desc(
      platform="cuda", target_config=gpu_target_config(gpu), topology=f"1x1x{count}"
    ).devices
  except Exception as e:  # no CUDA plugin in this JAX
    raise UserError(
      f"--topology={name}: cannot describe it ({type(e).__name__}: "
      f"{str(e).splitlines()[0] if str(e) else ''}); compiling for a GPU without one needs "
      f"JAX's CUDA plugin and libraries (pip install -e '.[cuda]', or 'jax[cuda12]"
      f"=={jax.__version__}') and, on a host with no GPU, JAX_PLATFORMS=cpu"
    ) from None


def topology_devices(name: str):
  """The devices of ``name`` (a TPU topology, an NVIDIA GPU of ``GPUS`` (``h100``,
  ``h100:8``), or "local" for this process's)."""
  if name == "local":
    return jax.devices()
  if name.lower().partition(":")[0] in GPUS:
    return _gpu_devices(name)
  try:
    devices = topologies.get_topology_desc(name, platform="tpu").devices
    if any(getattr(d, "core_on_chip", 0) for d in devices):  # v4 / v5p: one device per chip
      devices = topologies.get_topology_desc(
        name, platform="tpu", chip_config_name="megacore"
      ).devices
  except Exception as e:  # libtpu absent, or a name it does not know
    raise UserError(
      f"--topology={name}: cannot describe it ({type(e).__name__}: "
      f"{str(e).splitlines()[0] if str(e) else ''}); expected a TPU topology "
      "such as v5e:2x2, v5e:4x4, v4:2x2x2 or v5p:2x2x2 (needs libtpu: pip install "
      f"-e '.[tpu]' or '.[test]'), a GPU ({', '.join(GPUS)}, or h100:8 for 8), or 'local'"
    ) from None
  return devices


def _array_bytes(shape_text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text):
    size = 1
    for d in filter(None, dims.split(",")):
      size *= int(d)
    total += size * _BYTES.get(dtype, 4)
  return total


# An array with its layout: XLA:TPU writes the memory space in it, S(1) for the core's
# VMEM, S(2) for SMEM; no S(n) (or S(0)) is HBM.
_PLACED_ARRAY = re.compile(r"\b(pred|[suf](?:8|16|32|64)|bf16|c64|c128)\[([\d,]*)\](\{[^}]*\})?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")


_LAYOUT = re.compile(r"^\{([\d,]*)(?::T\(([\d,]+)\))?")


def _stored_elements(dims: str, layout: str) -> int:
  """Elements an array takes in memory: its dims, the most-minor ones padded up to its
  layout's first tile (``{1,0:T(8,128)}``: rows to 8, columns to 128, as XLA:TPU stores
  them); the dims' product where the layout names no tile."""
  sizes = [int(d) for d in filter(None, dims.split(","))]
  match = _LAYOUT.match(layout)
  if match and match.group(2) and match.group(1):
    minor_to_major = [int(d) for d in match.group(1).split(",")]
    tile = [int(t) for t in match.group(2).split(",")]
    for dim, t in zip(minor_to_major, reversed(tile)):
      sizes[dim] = -(-sizes[dim] // t) * t
  total = 1
  for s in sizes:
    total *= s
  return total


def _in_hbm(layout: str) -> bool:
  space = _MEMORY_SPACE.search(layout)
  return not space or space.group(1) == "0"


def _stored_bytes(dtype: str, dims: str, layout: str) -> int:
  return _stored_elements(dims, layout) * _BYTES.get(dtype, 4)


def _hbm_bytes(shape_text: str) -> int:
  """The bytes of the arrays in ``shape_text`` that live in HBM, as stored (tile-padded):
  not those in an on-chip memory space (an operand a prefetch has brought into VMEM is
  read from there)."""
  return sum(
    _stored_bytes(*array) for array in _PLACED_ARRAY.findall(shape_text) if _in_hbm(array[2])
  )


def _moved_bytes(op: str, shape: str, operands: str) -> int:
  """The HBM bytes one instruction reads and writes (``traffic``)."""
  if op == "slice-start":
    # ((the source), the slice, a context): the slice is read from the source and
    # written to its own place; whichever of the two is in HBM counts.
    arrays = _PLACED_ARRAY.findall(shape)
    if len(arrays) < 2:
      return _hbm_bytes(shape) + _hbm_bytes(operands)
    source, destination = arrays[0], arrays[1]
    return _stored_bytes(*destination) * (_in_hbm(source[2]) + _in_hbm(destination[2]))
  if op.endswith("-start"):  # the result tuple also holds the operands
    return max(_hbm_bytes(shape), _hbm_bytes(operands))
  return _hbm_bytes(shape) + _hbm_bytes(operands)


def hlo_summary(hlo_text: str) -> dict:
  """Collectives (count, bytes of their results) and op counts of a compiled HLO module."""
  collectives = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
  ops = {
    "gather": 0,
    "scatter": 0,
    "grouped_convolution": 0,
    "pallas_kernel": 0,
    "cudnn_attention": 0,  # cuDNN's fused attention calls, forward and backward
  }
  inside_fused_collective = False
  for line in hlo_text.splitlines():
    # XLA:TPU writes a reduce-scatter as a fusion calling an "all-reduce-scatter"
    # computation: counted at the call, the all-reduce in its body skipped.
    if _FUSED_REDUCE_SCATTER.match(line):
      inside_fused_collective = True
    elif inside_fused_collective:
      inside_fused_collective = line.strip() != "}"
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    shape, op = match.groups()
    if op == "fusion" and "calls=%all-reduce-scatter" in line:
      op = "reduce-scatter"
    # An asynchronous collective is a -start / -done pair: counted at its start, its bytes
    # read off the -done result (a -start's tuple also holds its operands).
    kind = re.sub(r"-(start|done)$", "", op)
    if kind in collectives:
      if not op.endswith("-done"):
        collectives[kind]["count"] += 1
      if not op.endswith("-start"):
        collectives[kind]["bytes"] += _array_bytes(shape)
    elif op in ("gather", "scatter"):
      ops[op] += 1
    elif op == "custom-call" and 'custom_call_target="tpu_custom_call"' in line:
      ops["pallas_kernel"] += 1
    elif op == "custom-call" and 'custom_call_target="__cudnn$fmha' in line:
      ops["cudnn_attention"] += 1
    elif op in ("convolution", "custom-call") and re.search(  # XLA:GPU's: cuDNN calls
      r"feature_group_count=([2-9]|\d\d+)", line
    ):
      ops["grouped_convolution"] += 1
  return {"collectives": {k: v for k, v in collectives.items() if v["count"]}, "ops": ops}


_SKIP = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all"}
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')


def _dims(shape_text: str):
  match = _ARRAY.search(shape_text)
  return [int(d) for d in filter(None, match.group(2).split(","))] if match else []


def _operands(rest: str) -> str:
  """The operand list of an instruction (the text up to its closing parenthesis)."""
  depth = 1
  for i, ch in enumerate(rest):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      return rest[:i]
  return rest


def _operand_shapes(operands: str, shapes: dict) -> str:
  """The operands' shapes: as written, or (where only names are) looked up in ``shapes``."""
  if _ARRAY.search(operands):
    return operands
  return " ".join(shapes.get(n, "") for n in re.findall(r"%([\w.\-]+)", operands))


def _flops(op: str, shape: str, operands: str, line: str) -> float:
  """A dot's or convolution's FLOPs (2 x multiply-adds) from its shapes (``operands``:
  their shapes, in order); 0 otherwise."""
  out = 1
  for d in _dims(shape):
    out *= d
  arrays = _ARRAY.findall(operands)
  if op == "dot" and arrays:
    lhs = [int(d) for d in filter(None, arrays[0][1].split(","))]
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
    size = 1
    for i in filter(None, (contracting.group(1) if contracting else "").split(",")):
      size *= lhs[int(i)]
    return 2.0 * out * size
  if op == "convolution" and len(arrays) > 1:
    # Per output element: the input features times, along each spatial dimension, the
    # kernel taps that can land on the input (no more than the input is long). XLA:TPU
    # writes some dots as convolutions whose window slides over an input of size 1 with
    # padding around it (``window={size=8x128 pad=7_7x127_127}``): one tap of the 8 x 128.
    lhs, kernel = ([int(d) for d in filter(None, a[1].split(","))] for a in arrays[:2])
    labels = re.search(r"dim_labels=(\w+)_(\w+)->", line)
    lhs_labels, kernel_labels = labels.groups() if labels else ("", "")
    spatial = {label: size for label, size in zip(lhs_labels, lhs) if label.isdigit()}
    per_output = 1
    for label, d in zip(kernel_labels, kernel):
      if label == "i":
        per_output *= d
      elif label.isdigit():
        per_output *= min(d, spatial.get(label, d))
    return 2.0 * out * per_output
  return 0.0


def _computations(hlo_text: str) -> dict:
  """Computation name -> its instruction lines; the entry computation under "ENTRY"."""
  found, name = {}, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      name = "ENTRY" if header.group(1) else header.group(2)
      found[name] = []
    elif name is not None and line.strip() and line.strip() != "}":
      found[name].append(line)
  return found


def _module(line: str) -> str:
  """The Flax module path an instruction comes from (its op_name metadata, without the
  transformations' wrappers: jit(step)/jvp(...)/transpose(...))."""
  match = re.search(r'op_name="([^"]*)"', line)
  if not match:
    return ""
  # Dropped: transformations (jvp(...), transpose(...)) and flax's Class.method entries.
  parts = [
    p for p in match.group(1).split("/") if p and "." not in p and not re.match(r"^\w+\(.*\)$", p)
  ]
  return "/".join(parts)


def traffic(hlo_text: str, top: Optional[int] = 10) -> list:
  """The ``top`` instructions (all: None) of the entry computation (and the loops it runs) by the
  HBM bytes they move: operands read plus result written, each from its shape (what a
  fusion or kernel reads from and writes to HBM; a custom call's are counted the same way,
  from its operand and result shapes, whatever it does inside). Arrays in an on-chip
  memory space (XLA:TPU's VMEM, ``S(1)`` in the layout) are not counted: the asynchronous
  copies and slices that bring them there (``copy-start``, ``slice-start``) are, once: a
  copy the larger of its operand and its result (its result tuple also holds the
  operand), a slice the slice's bytes. FLOPs: the dots and convolutions inside (2 x
  multiply-adds). Cycles: XLA:TPU's own estimate for the op (its backend config's
  ``estimated_cycles``), 0 where it gives none (Pallas kernels, asynchronous copies,
  every op of other platforms)."""
  computations = _computations(hlo_text)
  bodies = {"ENTRY"}
  for line in computations.get("ENTRY", ()):
    bodies.update(re.findall(r"body=%?([\w.\-]+)", line))
  shapes = {}  # instruction name -> its shape text, over every computation
  for lines in computations.values():
    for line in lines:
      match = _LINE.match(line)
      if match:
        shapes[match.group(1)] = match.group(2)
  rows = []
  for body in sorted(bodies):
    for line in computations.get(body, ()):
      match = _LINE.match(line)
      if not match:
        continue
      name, shape, op, rest = match.groups()
      if op in _SKIP or op in ("while", "call", "conditional") or op.endswith("-done"):
        continue
      operands = _operand_shapes(_operands(rest), shapes)
      flops = _flops(op, shape, operands, line)
      for called in re.findall(r"calls=%?([\w.\-]+)", line):
        for inner in computations.get(called, ()):
          m = _LINE.match(inner)
          if m and m.group(3) in ("dot", "convolution"):
            inner_operands = _operand_shapes(_operands(m.group(4)), shapes)
            flops += _flops(m.group(3), m.group(2), inner_operands, inner)
      kind = re.search(r"kind=(\w+)", line) if op == "fusion" else None
      cycles = _CYCLES.search(line)
      rows.append(
        {
          "op": name,
          "kind": f"fusion:{kind.group(1)}" if kind else op,
          "module": _module(line),
          "bytes": _moved_bytes(op, shape, operands),
          "flops": flops,
          "cycles": int(cycles.group(1)) if cycles else 0,
        }
      )
  rows.sort(key=lambda r: -r["bytes"])
  return rows if top is None else rows[:top]


def _part(module: str, kind: str = "") -> str:
  """The part of the model an op's module path belongs to: the path up to the block's
  sub-layer, with the block's index dropped (``student/encoder/block1_0/attn/proj/dot``
  -> ``student/encoder/block1/attn``), so a stage's blocks add up. Ops without a module
  (the optimizer, layout copies, collectives) are told apart by their kind."""
  if not module:
    return f"(no module: {kind or 'op'})"
  parts = module.split("/")
  for i, p in enumerate(parts):
    if re.fullmatch(r"block\d+_\d+", p):
      return "/".join(parts[:i] + [p.split("_")[0]] + parts[i + 1 : i + 2])
  return "/".join(parts[:3])


def traffic_by_part(rows: list, top: int = 15, order: str = "bytes") -> list:
  """Every op's bytes, FLOPs and estimated cycles (``traffic(top=None)``) summed by the part
  of the model it comes from (``_part``), the ``top`` largest by ``order`` (bytes or
  cycles) first, each with its share of that sum: where the rest goes when no single op
  stands out."""
  parts = {}
  for r in rows:
    part = parts.setdefault(
      _part(r["module"], r.get("kind", "")), {"bytes": 0, "flops": 0.0, "cycles": 0, "ops": 0}
    )
    part["bytes"] += r["bytes"]
    part["flops"] += r["flops"]
    part["cycles"] += r.get("cycles", 0)
    part["ops"] += 1
  total = sum(v[order] for v in parts.values()) or 1
  ordered = sorted(parts.items(), key=lambda kv: -kv[1][order])[:top]
  return [
    {
      "part": name,
      "ops": v["ops"],
      "gib": round(v["bytes"] / 2**30, 4),
      "share": round(v[order] / total, 4),
      "gflop": round(v["flops"] / 1e9, 3),
      "cycles": v["cycles"],
    }
    for name, v in ordered
  ]


def _kernels(form: str, ops: dict) -> dict:
  native = form != "cpu"
  attention = {
    "cpu": "einsums + hand-written softmax VJP",
    "native": "jax.nn.dot_product_attention",
    "tpu": "Pallas splash attention where queries and keys tile by 128, else native",
    "gpu": "cuDNN flash attention for bfloat16/float16 heads of at most 128, else native",
  }[form]
  return {
    "form": form,
    "depthwise_conv": "grouped convolution" if native else "nine shifted multiply-adds",
    "attention": attention,
    "resize": "interpolation-matrix contractions" if native else "gathers + gather VJP",
    "compiled_ops": ops,
  }


def _memory_gib(compiled) -> float:
  m = compiled.memory_analysis()
  if m is None:
    return float("nan")
  total = (
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  )
  return total / 2**30


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost or {}


def _flops_lowered_on_cpu(config) -> float:
  """XLA's FLOP count of the whole step with the native kernels, lowered (not compiled)
  for this host's CPU: XLA:GPU counts none for a program compiled without a GPU. The
  native attention does the same matmuls as cuDNN's."""
  native = config.copy_and_resolve_references()  # on one CPU device, as one program
  native.update(kernels="native", mesh_shape=(-1, 1), sharding="replicate")
  run = build.training(native, weights=False, devices=jax.devices("cpu")[:1])
  teacher = None if run.teacher is None else run.teacher.abstract
  lowered = run.train_step.lower(run.abstract_state, teacher, build.batch_spec(native))
  return float(_cost(lowered).get("flops", float("nan")))


def _capacity_gib(device, chip: Optional[Chip]) -> Optional[float]:
  try:
    stats = device.memory_stats()  # a real accelerator knows its own
  except Exception:
    stats = None
  if stats and stats.get("bytes_limit"):
    return stats["bytes_limit"] / 2**30
  return chip.hbm_gib if chip else None


def compile_report(config, topology: str, with_eval: bool = True, save_hlo: str = "") -> dict:
  """Compiles the train step (and the eval step) for ``topology``; returns the JSON row.
  ``save_hlo``: a file to write the compiled train step's HLO text to."""
  devices = topology_devices(topology)
  run = build.training(config, weights=False, devices=devices)
  mesh = run.mesh
  device = mesh.devices.flat[0]
  per_device_batch = config.batch_size / mesh.size

  start = time.perf_counter()
  compiled = run.train_step.lower(
    run.abstract_state,
    None if run.teacher is None else run.teacher.abstract,
    build.batch_spec(config, mesh),
  ).compile()
  compile_s = time.perf_counter() - start
  eval_compiled, eval_compile_s = None, float("nan")
  if with_eval:
    start = time.perf_counter()
    eval_compiled = run.eval_step.lower(
      run.deployed(run.abstract_state), eval_batch_spec(config, mesh)
    ).compile()
    eval_compile_s = time.perf_counter() - start

  chip = chip_of(device)
  capacity = _capacity_gib(device, chip)
  hbm = _memory_gib(compiled)
  cost = _cost(compiled)
  flops = float(cost.get("flops", float("nan")))
  if flops != flops and device.platform == "gpu":
    flops = _flops_lowered_on_cpu(config) / mesh.size
  hlo_text = compiled.as_text()
  if save_hlo:
    with open(save_hlo, "w") as f:
      f.write(hlo_text)
  summary = hlo_summary(hlo_text)
  row = {
    "bench": "compile",
    "method": config.method,
    "platform": device.platform,
    "device_kind": device.device_kind,
    "topology": topology,
    "devices": mesh.size,
    "hosts": len({d.process_index for d in mesh.devices.flat}),
    "mesh_shape": [mesh.shape["data"], mesh.shape["model"]],
    "sharding": config.sharding,
    "batch_size": config.batch_size,
    "height": config.image_size[0],
    "width": config.image_size[1],
    "dtype": config.dtype,
    "teacher_dtype": config.teacher_dtype or config.dtype,
    "compile_s": round(compile_s, 2),
    "eval_compile_s": round(eval_compile_s, 2) if with_eval else None,
    "hbm_gib_per_device": round(hbm, 3),
    "eval_hbm_gib_per_device": round(_memory_gib(eval_compiled), 3) if with_eval else None,
    "hbm_capacity_gib": capacity,
    "fits": None if capacity is None else hbm <= capacity,
    "tflops_per_step_per_device": float(f"{flops / 1e12:.4g}"),
    "collectives": summary["collectives"],
    "kernels": _kernels(run.kernels, summary["ops"]),
  }
  bytes_accessed = float(cost.get("bytes accessed", float("nan")))
  row["hbm_bytes_per_image"] = (  # None on a GPU: XLA:GPU counts no bytes either
    round(bytes_accessed / per_device_batch)
    if per_device_batch and bytes_accessed == bytes_accessed
    else None
  )
  every_op = traffic(hlo_text, top=None)
  row["top_traffic"] = [
    {**r, "gib": round(r["bytes"] / 2**30, 4), "gflop": round(r["flops"] / 1e9, 3)}
    for r in every_op[:10]
  ]
  hbm_bytes = sum(r["bytes"] for r in every_op)
  row["traffic_gib_from_shapes"] = round(hbm_bytes / 2**30, 3)
  row["traffic_by_part"] = traffic_by_part(every_op)
  if chip is not None:
    seconds = max(flops / (chip.bf16_tflops * 1e12), bytes_accessed / (chip.hbm_gb_per_s * 1e9))
    known = flops == flops and bytes_accessed == bytes_accessed  # not NaN: XLA:GPU counts
    # no bytes, and then only the bound on the shapes' bytes below is given
    row.update(
      {
        "est_step_ms": round(seconds * 1e3, 3) if known else None,
        "est_imgs_per_s_per_chip": round(per_device_batch / seconds, 2) if known else None,
        "est_note": "roofline bounds from the chip's peak bfloat16 FLOP/s and HBM bandwidth: "
        "the step takes at least est_step_ms, so at most est_imgs_per_s_per_chip",
      }
    )
    # The same bound on the HBM bytes from the shapes: XLA's count also charges HBM for
    # operands a prefetch has placed in VMEM, so its bound is the lower of the two.
    hbm_seconds = max(flops / (chip.bf16_tflops * 1e12), hbm_bytes / (chip.hbm_gb_per_s * 1e9))
    row["est_imgs_per_s_per_chip_hbm_only"] = (
      round(per_device_batch / hbm_seconds, 2) if hbm_seconds else None
    )
    cycles = sum(r["cycles"] for r in every_op)
    if chip.clock_ghz and cycles:
      # Not a bound: XLA:TPU's own estimate of its ops' time, one after another; the
      # Pallas kernels and asynchronous copies carry none and are left out.
      compiler_seconds = cycles / (chip.clock_ghz * 1e9)
      row["est_step_ms_compiler"] = round(compiler_seconds * 1e3, 3)
      row["est_imgs_per_s_per_chip_compiler"] = round(per_device_batch / compiler_seconds, 2)
      row["time_by_part"] = [
        {
          "part": p["part"],
          "ms": round(p["cycles"] / (chip.clock_ghz * 1e6), 3),
          "share": p["share"],
        }
        for p in traffic_by_part(every_op, order="cycles")
      ]
  return row


def eval_batch_spec(config, mesh) -> dict:
  """The eval step's batch: images at ``config.image_size``, labels at a quarter of it
  (``reference`` protocol) or at the image's size (``standard``; a dataset whose labels
  are larger, as Cityscapes' 1024 x 2048, needs more), the valid flags."""
  spec = build.batch_spec(config, mesh)
  if config.eval_protocol == "standard":  # labels at the input's size
    label = spec["label"]
    spec["label"] = jax.ShapeDtypeStruct(
      (config.batch_size, *config.image_size), label.dtype, sharding=label.sharding
    )
  spec["valid"] = jax.ShapeDtypeStruct(
    (config.batch_size,), jax.numpy.bool_, sharding=spec["image"].sharding
  )
  return spec


def does_not_fit(row: dict) -> Optional[str]:
  """One line saying by how much the step misses the device memory and what to change."""
  if row["fits"] is not False:
    return None
  need, have = row["hbm_gib_per_device"], row["hbm_capacity_gib"]
  per_device = row["batch_size"] // (row["mesh_shape"][0] * row["mesh_shape"][1])
  hints = [f"the batch (now {per_device} per device: --config.per_device_batch_size)"]
  if row["sharding"] != "fsdp" or row["mesh_shape"][1] == 1:
    hints.append(
      "--config.sharding=fsdp --config.mesh_shape=(-1,N) to split parameters and "
      "optimiser state N ways"
    )
  if row["dtype"] != "bfloat16":
    hints.append("--config.dtype=bfloat16")
  return (
    f"the step needs {need:.2f} GiB per device, {need - have:.2f} GiB more than the "
    f"{row['device_kind']}'s {have:.1f} GiB: lower " + ", or ".join(hints)
  )
