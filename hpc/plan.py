"""Memory and communication model of DP, DDP and DeepSpeed ZeRO 0-3, and the backend it recommends.

    rows = estimate(7_000_000_000, nodes=4, gpus_per_node=8, gpu_memory_bytes=80 * 10**9, precision="bf16")
    choice = recommend(7_000_000_000, 4, 8, 80 * 10**9, "bf16")   # -> Recommendation(backend="deepspeed", ...)

Accounting follows the ZeRO paper (Rajbhandari et al. 2020, section 3): per parameter, mixed-precision Adam
keeps 2 bytes of bf16/fp16 parameters, 2 bytes of gradients and K = 12 bytes of optimizer state (fp32
master copy, momentum, variance); ZeRO-1 divides the optimizer state by the data-parallel degree Nd,
ZeRO-2 the gradients too, ZeRO-3 the parameters too. Only model states are counted: activations,
communication buckets, ZeRO-3's gathered parameters and allocator fragmentation are what the headroom
(MODEL_STATE_FRACTION) is kept for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hpc import vocab

# Model states may use this share of a GPU's memory; the rest is left for activations, temporary buffers
# (gradient buckets, ZeRO-3's gathered layers) and fragmentation, which grow with batch and sequence length.
MODEL_STATE_FRACTION = 0.80

# `hpcdist plan --precision auto` knows neither device nor config; planning it as fp32, which needs at least as
# much as bf16 in every plan, keeps a "fits" true whichever it becomes (render plans in what hpc.dsconfig decides).
PLANNED_AS = {"auto": "fp32"}
OPTIMIZERS = ("adam", "sgd")

# DeepSpeed stores parameters and gradients in the training dtype, so they shrink with it.
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# Optimizers keep their moments in fp32 whatever the training dtype (Adam: momentum and variance; SGD:
# momentum), so these do not shrink with precision.
MOMENT_BYTES = {"adam": 8, "sgd": 4}

# An fp32 master copy of the parameters. Mixed precision needs one by design; DeepSpeed's ZeRO-1/2/3
# optimizers also keep one for an fp32 model (measured: tools/memprobe.py, tests/test_plan_measured.py),
# so only DP/DDP/ZeRO-0 in fp32 step the parameters in place.
MASTER_BYTES = 4

# Parsing suffixes: counts are SI (7B = 7e9), byte sizes SI (GB, or G alone) or IEC (GiB), as GPU vendors and
# nvidia-smi write them.
COUNT_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
BYTE_SUFFIXES = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
                 "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

# Built-in models: name -> layers as ("conv", in_channels, out_channels, kernel) or ("fc", in, out).
MODELS = {
    "convnet": (("conv", 3, 32, 3), ("conv", 32, 64, 3), ("fc", 2304, 128), ("fc", 128, 10)),
}

# Printed least communication first and offload last, the order recommend() weighs them in, so the table
# reads top-down as the decision.
PLANS = {
    "dp": {"label": "DP (nn.DataParallel)", "backend": "dp", "zero_stage": None, "offload": False},
    "ddp": {"label": "DDP", "backend": "ddp", "zero_stage": None, "offload": False},
    "zero0": {"label": "ZeRO-0", "backend": "deepspeed", "zero_stage": 0, "offload": False},
    "zero1": {"label": "ZeRO-1", "backend": "deepspeed", "zero_stage": 1, "offload": False},
    "zero2": {"label": "ZeRO-2", "backend": "deepspeed", "zero_stage": 2, "offload": False},
    "zero3": {"label": "ZeRO-3", "backend": "deepspeed", "zero_stage": 3, "offload": False},
    "zero2-offload": {"label": "ZeRO-2 + offload opt", "backend": "deepspeed", "zero_stage": 2, "offload": True},
    "zero3-offload": {"label": "ZeRO-3 + offload opt+params", "backend": "deepspeed", "zero_stage": 3,
                      "offload": True},
}


class PlanError(ValueError):
    """Input the model cannot plan for; the message names the fix."""


@dataclass(frozen=True)
class Estimate:
    name: str                 # key of PLANS
    label: str
    backend: str              # 'dp' | 'ddp' | 'deepspeed'
    zero_stage: int | None
    offload: bool
    params_bytes: int         # per GPU, the busiest one
    grads_bytes: int
    optimizer_bytes: int
    cpu_bytes: int            # per rank in host memory (offloaded states)
    comm_volume: float        # elements moved per step by the busiest GPU, in multiples of the parameter count
    fits: bool | None         # model states <= MODEL_STATE_FRACTION of GPU memory; None when memory unknown
    applicable: bool          # DP cannot span nodes
    note: str

    @property
    def gpu_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes


@dataclass(frozen=True)
class Recommendation:
    backend: str              # 'dp' | 'ddp' | 'deepspeed'
    zero_stage: int | None
    offload: bool
    reason: str


MAX_PARAMS = 1e15   # a thousand times the largest models trained today
MAX_BYTES = 1e18    # an exabyte per device


def parse_count(text: str) -> int:
    """'7B' -> 7_000_000_000, '1.3B', '350M', '125k', '7e9', '315722'."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise PlanError(f"cannot read parameter count {text!r}: write e.g. 7B, 1.3B, 350M or 125000")
    return _bounded(float(m.group(1)) * COUNT_SUFFIXES[m.group(2).lower()], MAX_PARAMS, "parameter count", text)


def _bounded(value: float, most: float, what: str, text: str) -> int:
    """``value`` as a positive whole number, or PlanError past ``most`` (1e400 reads as infinity, 1e300 as a
    float no model has)."""
    if not value <= most:
        raise PlanError(f"{what} {text[:40]!r} is out of range; give at most {most:.0e}")
    if round(value) <= 0:
        raise PlanError(f"{what} {text!r} must be positive")
    return round(value)


def parse_bytes(text: str) -> int:
    """'80GB' -> 80e9, '80GiB' -> 80 * 2**30, '40G' -> 40e9, '512MiB'."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*", str(text), re.IGNORECASE)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in BYTE_SUFFIXES:
        raise PlanError(f"cannot read memory size {text!r}: write e.g. 80GB, 80GiB or 24G")
    if not unit and float(m.group(1)) < 2**20:
        # A bare number is bytes; one this small is a size in GB with its unit left off, not a GPU's memory.
        raise PlanError(f"memory size {text.strip()!r} has no unit, so it reads as bytes: write e.g. "
                        f"{text.strip()}GB or {text.strip()}GiB")
    return _bounded(float(m.group(1)) * BYTE_SUFFIXES[unit], MAX_BYTES, "memory size", text)


def model_params(name: str) -> int:
    """Parameter count of a built-in model, from its layer shapes (weights plus biases)."""
    if name not in MODELS:
        raise PlanError(f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))} or give --params")
    return sum(cin * cout * (kernel[0] ** 2 if kind == "conv" else 1) + cout
               for kind, cin, cout, *kernel in MODELS[name])


def _check(params: int, nodes: int, gpus_per_node: int, gpu_memory_bytes: int | None, precision: str,
           optimizer: str) -> None:
    if params <= 0:
        raise PlanError("the parameter count must be positive: give --params, e.g. 7B")
    if nodes < 1 or gpus_per_node < 1:
        raise PlanError("--nodes and --gpus-per-node must be at least 1")
    if gpu_memory_bytes is not None and gpu_memory_bytes <= 0:
        raise PlanError("--gpu-memory must be positive")
    if precision not in vocab.DTYPES and precision not in PLANNED_AS:
        raise PlanError(f"unknown precision {precision!r}: choose one of {', '.join(vocab.DTYPES)}")
    if optimizer not in OPTIMIZERS:
        raise PlanError(f"unknown optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")


def _states(plan: dict, params: int, nd: int, precision: str, optimizer: str) -> tuple[int, int, int, int]:
    """(params, grads, optimizer on GPU, bytes on host) per rank for one of PLANS, from the paper's rules."""
    stage = plan["zero_stage"]
    moments = MOMENT_BYTES[optimizer] * params
    if plan["backend"] != "deepspeed":
        # torch autocast keeps fp32 weights and gradients and casts per op, so DP/DDP hold 4 + 4 bytes and
        # need no master copy whatever the compute precision.
        return 4 * params, 4 * params, moments, 0
    dtype = DTYPE_BYTES[precision]
    master = MASTER_BYTES * params if precision != "fp32" or stage > 0 else 0
    p, g, o = dtype * params, dtype * params, master + moments

    def shard(x: int) -> int:
        return -(-x // nd)

    # ZeRO-N partitions the optimizer state from N = 1, the gradients from N = 2, the parameters at N = 3.
    p, g, o = (shard(x) if stage >= level else x for x, level in ((p, 3), (g, 2), (o, 1)))
    if not plan["offload"]:
        return p, g, o, 0
    # ZeRO-Offload: the optimizer steps on the CPU, so the fp32 gradient partition and the optimizer state
    # live in host memory; ZeRO-3 also offloads its parameter partition.
    host = shard(4 * params) + o
    if stage == 3:
        return 0, 0, 0, host + p
    return p, 0, 0, host


def _comm(name: str, gpus_per_node: int) -> tuple[float, str]:
    """Elements moved per step by the busiest GPU, in multiples of the parameter count, and why."""
    if name == "dp":
        extra = max(gpus_per_node - 1, 0)
        return 2.0 * extra, (f"single process: GPU 0 broadcasts parameters to {extra} replicas and gathers their "
                             "gradients and outputs every step, the GPU-0 hot spot; GIL-bound")
    if name in ("zero3", "zero3-offload"):
        note = "parameters all-gathered in forward and backward, gradients reduce-scattered"
        return 3.0, note + ("; host<->GPU copies of parameters and gradients each step" if "offload" in name else "")
    if name == "zero2-offload":
        return 2.0, "reduce-scatter + all-gather as ZeRO-2; gradients to host and parameters back each step"
    notes = {"ddp": "all-reduce of gradients, overlapped with backward",
             "zero0": "all-reduce of gradients (DeepSpeed's DDP)",
             "zero1": "reduce-scatter + all-gather; reduces only at accumulation boundaries",
             "zero2": "reduce-scatter + all-gather; reduces every micro-batch"}
    return 2.0, notes[name]


def estimate(params: int, nodes: int, gpus_per_node: int, gpu_memory_bytes: int | None, precision: str,
             optimizer: str = "adam") -> tuple[Estimate, ...]:
    """Per-GPU model-state memory, communication volume and fit of every plan in PLANS."""
    _check(params, nodes, gpus_per_node, gpu_memory_bytes, precision, optimizer)
    precision = PLANNED_AS.get(precision, precision)
    nd = nodes * gpus_per_node
    budget = None if gpu_memory_bytes is None else gpu_memory_bytes * MODEL_STATE_FRACTION
    rows = []
    for name, plan in PLANS.items():
        p, g, o, host = _states(plan, params, nd, precision, optimizer)
        volume, note = _comm(name, gpus_per_node)
        applicable = not (name == "dp" and nodes > 1)
        if not applicable:
            note = "nn.DataParallel is one process on one node; use DDP or DeepSpeed across nodes"
        fits = None if budget is None else (applicable and p + g + o <= budget)
        rows.append(Estimate(name=name, **plan, params_bytes=p, grads_bytes=g, optimizer_bytes=o, cpu_bytes=host,
                             comm_volume=volume, fits=fits, applicable=applicable, note=note))
    return tuple(rows)


def human_bytes(n: float) -> str:
    """Decimal units, as the ZeRO paper and GPU data sheets give them: 31.4 GB, 5.1 MB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def recommend(params: int, nodes: int, gpus_per_node: int, gpu_memory_bytes: int | None, precision: str,
              optimizer: str = "adam") -> Recommendation:
    """The backend with the least communication whose model states fit, offloading only when nothing else does."""
    rows = {e.name: e for e in estimate(params, nodes, gpus_per_node, gpu_memory_bytes, precision, optimizer)}
    nd, planned = nodes * gpus_per_node, PLANNED_AS.get(precision, precision)
    budget = f"{MODEL_STATE_FRACTION:.0%} of {human_bytes(gpu_memory_bytes)}" if gpu_memory_bytes else ""
    ddp = rows["ddp"]
    hb = human_bytes
    if gpu_memory_bytes is None:
        return Recommendation("ddp", None, False, "GPU memory unknown: DDP, the least communication "
                              f"(2x params per step); model states need {hb(ddp.gpu_bytes)} per GPU")
    if ddp.fits:
        return Recommendation("ddp", None, False, f"model states {hb(ddp.gpu_bytes)} per GPU fit in {budget}: "
                              "DDP, the least communication (2x params all-reduced per step)")
    for row in (rows["zero1"], rows["zero2"]):
        if row.fits:
            what = "optimizer state" if row.zero_stage == 1 else "optimizer state and gradients"
            return Recommendation("deepspeed", row.zero_stage, False,
                                  f"DDP needs {hb(ddp.gpu_bytes)} per GPU, over {budget}; partitioning the {what} over "
                                  f"{nd} GPUs needs {hb(row.gpu_bytes)} in {planned} at DDP's communication volume")
    zero3 = rows["zero3"]
    if zero3.fits:
        return Recommendation("deepspeed", 3, False,
                              f"ZeRO-2 needs {hb(rows['zero2'].gpu_bytes)} per GPU, over {budget}; partitioning "
                              f"parameters too needs {hb(zero3.gpu_bytes)} in {planned} for 1.5x DDP's communication")
    # ZeRO-3 with parameters offloaded keeps no model state on the GPU, so it is the plan of last resort;
    # what it asks of host memory is in its reason.
    row = rows["zero2-offload"] if rows["zero2-offload"].fits else rows["zero3-offload"]
    return Recommendation("deepspeed", row.zero_stage, True,
                          f"even ZeRO-3 needs {hb(zero3.gpu_bytes)} per GPU, over {budget}; {row.label} keeps "
                          f"{hb(row.gpu_bytes)} on each GPU and {hb(row.cpu_bytes * gpus_per_node)} in each node's "
                          "host memory, paying PCIe copies every step")
