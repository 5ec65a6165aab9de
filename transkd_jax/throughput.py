"""How fast a step runs against what the hardware can do: FLOPs, TFLOP/s, MFU.

- ``step_flops(fn, *args)``: XLA's count of the FLOPs one call of the jitted
  ``fn`` does, over all devices, from the lowered program (nothing compiles).
  The CPU attention kernel loops over chunks of queries, and XLA counts a loop's
  body once, so the count is taken with the attention in one chunk
  (``kernels.unchunked``): the same arithmetic, without the chunked backward's
  recomputation (model FLOPs, as MFU counts them).
- ``CHIPS`` / ``chip_of(device)``: published per-device peaks (HBM, dense
  bfloat16 TFLOP/s, HBM bandwidth; the clock of a v5e) of the TPUs and GPUs we run on.
- ``rates(flops, seconds, devices)``: TFLOP/s per device and, where the device
  kind is known, model FLOPs utilisation against its dense bfloat16 peak.
"""

import dataclasses
from typing import Optional

from transkd_jax.models import kernels


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_gib: float  # memory per device
  bf16_tflops: float  # dense peak per device
  hbm_gb_per_s: float
  # The TensorCore clock, where a device is one TensorCore: XLA:TPU's per-op cycle
  # estimates (``benchmark compile``) are turned into time with it. None: not used.
  clock_ghz: Optional[float] = None


# Per device as JAX sees it (a v4 / v5p megacore is one device). Published figures.
CHIPS = {
  "TPU v3": Chip(16, 61.5, 450),  # per core (two per chip)
  "TPU v4": Chip(32, 275, 1228),
  # v5e: one TensorCore of four 128x128 MXUs per chip; 197 TFLOP/s / (4 x 128 x 128 x 2)
  # FLOP per cycle = 1.5 GHz.
  "TPU v5 lite": Chip(16, 197, 819, clock_ghz=1.5),
  "TPU v5": Chip(95, 459, 2765),  # v5p
  "TPU v6 lite": Chip(32, 918, 1640),  # v6e (Trillium)
  "H100": Chip(80, 989, 3350),  # SXM
  "H200": Chip(141, 989, 4800),
  "A100": Chip(80, 312, 2039),  # SXM 80 GB
}


def chip_of(device) -> Optional[Chip]:
  kind = device.device_kind
  if kind in CHIPS:
    return CHIPS[kind]
  for name, chip in CHIPS.items():
    if not name.startswith("TPU") and name in kind:
      return chip
  return None


def _flops(cost) -> Optional[float]:
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  flops = cost.get("flops") if isinstance(cost, dict) else None
  return float(flops) if flops is not None and flops >= 0 else None


def step_flops(fn, *args, compiled=None) -> float:
  """FLOPs of one call of the jitted ``fn`` on ``args`` (arrays or ShapeDtypeStructs),
  summed over devices; NaN when XLA gives no count.

  Counted on the lowered program; where a backend counts only compiled programs
  (XLA:GPU), on ``compiled`` (``fn``'s compiled executable: the native kernels
  have no loops to undercount).
  """
  with kernels.unchunked():
    flops = _flops(fn.lower(*args).cost_analysis())
  if flops is None and compiled is not None:
    flops = _flops(compiled.cost_analysis())
  return float("nan") if flops is None else flops


def rates(flops: float, seconds: float, devices) -> dict:
  """{"tflops_per_device", and "mfu" where the device kind's peak is known}."""
  devices = list(devices)
  per_device = flops / seconds / len(devices) / 1e12
  out = {"tflops_per_device": per_device}
  chip = chip_of(devices[0])
  if chip is not None:
    out["mfu"] = per_device / chip.bf16_tflops
  return out
