"""Measure DeepSpeed's model-state bytes per rank.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tools/memprobe.py \\
        --zero-stage 0 1 2 3 --precision fp32 bf16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import warnings

# DeepSpeed picks its accelerator on import; without a GPU it must be told, or it fails looking for CUDA.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(width: int, layers: int) -> torch.nn.Module:
    return torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))


def ds_config(stage: int, precision: str, bucket: int) -> dict:
    # Small buckets and no overlap/contiguous buffers: DeepSpeed's scratch space stays a few MB, so what
    # remains is the model states the planner estimates.
    zero = {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
            "overlap_comm": False, "contiguous_gradients": False}
    if stage == 3:
        zero.update({"stage3_prefetch_bucket_size": bucket, "stage3_param_persistence_threshold": 0,
                     "stage3_max_live_parameters": bucket, "stage3_max_reuse_distance": 0})
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}},
              "zero_optimization": zero, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    if precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 8}
    return config


# Where DeepSpeed's ZeRO and bf16 optimizers keep their fp32 master partitions.
MASTER_ATTRIBUTES = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")


def storages(tensors) -> dict[int, int]:
    """data_ptr -> nbytes of each distinct storage behind ``tensors``."""
    found: dict[int, int] = {}
    for t in tensors:
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            continue
        if s.data_ptr() and s.device.type == "cpu":
            found[s.data_ptr()] = s.nbytes()
    return found


def live_tensors() -> list:
    found = []
    with warnings.catch_warnings():
        # isinstance() on torch.distributed's deprecated module attributes warns; they are not tensors.
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor):
                    found.append(obj)
            except ReferenceError:
                continue
    return found


def engine_tensors(engine):
    """Tensors the engine keeps reachable from Python but that gc may not see (held only by C++)."""
    for p in engine.module.parameters():
        yield p
        if p.grad is not None:
            yield p.grad
        if hasattr(p, "ds_tensor"):
            yield p.ds_tensor
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    for state in inner.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))
    for group in inner.param_groups:
        for p in group["params"]:
            yield p
            if p.grad is not None:
                yield p.grad


def measure(engine, baseline: set[int]) -> dict:
    """Bytes of every storage alive now and not in ``baseline``, split into params, grads and optimizer."""
    gc.collect()
    held = storages(live_tensors())
    held.update(storages(engine_tensors(engine)))
    held = {ptr: n for ptr, n in held.items() if ptr not in baseline}
    # ZeRO-3 gathers whole layers for forward/backward and frees them after: working buffers bounded by
    # stage3_max_live_parameters, not model states, so they are reported apart.
    gathered = storages(p for p in engine.module.parameters() if hasattr(p, "ds_tensor") and p.numel())
    params = storages(t for p in engine.module.parameters() for t in (p, getattr(p, "ds_tensor", None))
                      if t is not None)
    held = {ptr: n for ptr, n in held.items() if ptr not in gathered}
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    masters = [t for name in MASTER_ATTRIBUTES for t in (getattr(opt, name, None) or [])
               if isinstance(t, torch.Tensor)]
    masters += [p for g in inner.param_groups for p in g["params"]]
    moments = [v for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.numel() > 1]
    optimizer = {ptr: n for ptr, n in storages(masters + moments).items() if ptr not in params}
    split = {"param_bytes": sum(n for ptr, n in held.items() if ptr in params),
             "optimizer_bytes": sum(n for ptr, n in held.items() if ptr in optimizer)}
    split["gradient_bytes"] = sum(held.values()) - split["param_bytes"] - split["optimizer_bytes"]
    split["model_state_bytes"] = sum(held.values())
    split["gathered_param_bytes"] = sum(gathered.values())
    return split


def settled(engine, baseline: set[int], looks: int = 3, pause_s: float = 0.1) -> dict:
    """The least of a few measures a moment apart: model states stay, a buffer on its way out goes. Twice in CI on
    a busy 2-core box, ZeRO-2's rank 1 still held the last reduced bucket (one whole gradient of a layer it does
    not own) at the first look after backward; never reproduced idle or under a CPU burner, so the cause (a
    communication thread letting go late, we suppose) is not established."""
    found = [measure(engine, baseline)]
    for _ in range(looks - 1):
        time.sleep(pause_s)
        found.append(measure(engine, baseline))
    return min(found, key=lambda split: split["model_state_bytes"])


def probe(stage: int, precision: str, args) -> dict:
    """Build, train ``args.steps`` steps, and report the model-state bytes held during the last one."""
    import deepspeed

    torch.manual_seed(0)
    gc.collect()
    baseline = set(storages(live_tensors()))
    model = build_model(args.width, args.layers)
    params = sum(p.numel() for p in model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=ds_config(stage, precision, args.bucket))
    dtype = DTYPES[precision]
    for _ in range(args.steps - 1):
        engine.backward(engine(torch.randn(2, args.width, dtype=dtype)).float().pow(2).mean())
        engine.step()
    # Count at two moments of the last step: just before DeepSpeed reduces gradients, when ZeRO-0/1 hold
    # every full gradient (model states until the optimizer steps), and after backward, when ZeRO-2/3 hold
    # only their partition. Before that, ZeRO-2/3 may still hold the last unreduced bucket (at least one
    # whole parameter's gradient): a temporary buffer, reported as the peak but not as model state.
    samples = {}
    reduce = engine.allreduce_gradients

    def measured_reduce(*a, **kw):
        samples["before_reduce"] = measure(engine, baseline)  # noqa: F821 - deleted only after the probe
        return reduce(*a, **kw)

    engine.allreduce_gradients = measured_reduce
    x = torch.randn(2, args.width, dtype=dtype)
    loss = engine(x).float().pow(2).mean()
    engine.backward(loss)
    del x, loss
    samples["after_backward"] = settled(engine, baseline)
    engine.step()
    states = samples["before_reduce" if stage <= 1 else "after_backward"]
    report = {"zero_stage": stage, "precision": precision, "params": params, **states,
              "peak_bytes": max(s["model_state_bytes"] for s in samples.values()),
              "samples": {k: s["model_state_bytes"] for k, s in samples.items()},
              "largest_param": max(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                   for p in engine.module.parameters())}
    engine.allreduce_gradients = reduce
    engine.destroy()
    del engine, model
    gc.collect()
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--zero-stage", type=int, nargs="+", choices=(0, 1, 2, 3), required=True)
    ap.add_argument("--precision", nargs="+", choices=sorted(DTYPES), default=["fp32"])
    # 4 x Linear(4096, 4096) = 67M parameters, 1.07 GB of fp32 model states per rank: large enough that
    # DeepSpeed's few-MB buffers stay under 1%, small enough for 8 runs in ~3.5 minutes on 2 CPU cores.
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--bucket", type=int, default=5_000_000)
    ap.add_argument("--out", help="Also append each report to OUT/memprobe-rank<R>.jsonl (ranks share stdout).")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args(argv)

    import deepspeed

    from train.runtime import without_shm_comm

    without_shm_comm()  # the trainer's own set-up: no ~40 s compile of an op that serves inference only
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    for precision in args.precision:
        for stage in args.zero_stage:
            t0 = time.time()
            report = probe(stage, precision, args)
            report.update({"rank": rank, "world_size": world, "wall_s": round(time.time() - t0, 1)})
            line = json.dumps(report)
            print("MEMPROBE " + line, flush=True)
            if args.out:
                with open(os.path.join(args.out, f"memprobe-rank{rank}.jsonl"), "a") as f:
                    f.write(line + "\n")
            torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
