"""Train the reference CIFAR-10 ConvNet with DataParallel, DDP or DeepSpeed, on CPUs or GPUs.

    python -m train --backend ddp --run-dir runs/one                          # one process
    torchrun --standalone --nproc_per_node 2 -m train --backend ddp --run-dir runs/ddp
    srun python -m train --backend deepspeed --zero-stage 3 --precision bf16 --run-dir runs/ds
    deepspeed --num_gpus 2 --module train --backend deepspeed --run-dir runs/ds
    python -m train --backend dp --dataset cifar10 --data-dir data --run-dir runs/dp --resume

Exit statuses (docs/CONTRACTS.md): 0 done, 2 bad input, 75 stopped by SIGUSR1/SIGTERM after a checkpoint,
76 hung (train/watchdog.py ended it), 130 interrupted by Ctrl-C (SIGINT).
"""

from __future__ import annotations

import time

STARTED = time.time()  # before torch's import, which is part of what a user waits for

import contextlib
import json
import os
import signal
import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from train import preemption  # before torch: a stop signal while it imports is a flag, a Ctrl-C one line

with preemption.starting():
    import torch

    TORCH_IMPORTED = time.time()
    from hpc import dsconfig, fileio, ranks, runfiles, vocab
    from hpc.vocab import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_STORAGE
    from train import checkpoint, dssnapshot, heartbeat, nodebeat, snapshot, watchdog
    from train.data import DataError, Dataset, load_dataset
    from train.engines import DeepSpeedEngine, Engine, TorchEngine, cpu_has_fp16, precision_and_config
    from train.evaluate import evaluate_accuracy
    from train.loader import ClassicLoader, ResidentLoader
    from train.model import ConvNet, param_digest
    from train.options import Options, parse
    from train.runtime import (
        PreflightError,
        UsageError,
        broadcast_from_0,
        device_name,
        gathered,
        init_process_group,
        leave,
        log_nccl_for_preflight,
        make_run_dir,
        peak_memory_bytes,
        pick_device,
        preflight,
        prepare_deepspeed_environment,
        reach_master,
        say,
        warn,
    )
    from train.stephooks import Clocks, StepHooks, Timing

# DeepSpeed calls torch.distributed's deprecated collective names on every step, burying the log.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


@dataclass(frozen=True)
class Setup:
    """What this rank trains with, decided before anything is built: its place, device, precision, batch."""

    opts: Options
    env: ranks.DistEnv
    device: torch.device
    precision: str
    ds_config: dict | None  # DeepSpeed's config as deepspeed.initialize gets it; None for dp/ddp
    global_batch: int
    threads: int

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world(self) -> int:
        return self.env.world_size

    @property
    def run_dir(self) -> Path:
        return Path(self.opts.run_dir)

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / vocab.CHECKPOINTS

    @property
    def snapshot_every_s(self) -> float:
        return snapshot.every_s(self.opts.snapshot_every_s, os.environ)


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    preemption.install(interrupt=True)  # SIGUSR1/SIGTERM's there since import; again for a caller of main() twice
    beat = heartbeat.Heartbeat(opts.run_dir, every_s=opts.heartbeat_s,
                               marks={"process_start": STARTED, "torch_imported": TORCH_IMPORTED})
    status = None
    try:
        status = train(opts, beat)
    except (UsageError, DataError, dsconfig.ConfigError, ranks.RankError, nodebeat.StageError,
            checkpoint.CheckpointError, fileio.UnsafePath) as exc:
        print(f"hpcdist-train: error: {exc}", file=sys.stderr, flush=True)
        runfiles.record_rank_error(opts.run_dir, os.environ, str(exc), "bad_input", EXIT_BAD_INPUT)
        status = EXIT_BAD_INPUT
    except PreflightError as exc:
        print(f"hpcdist-train: {exc}", file=sys.stderr, flush=True)
        status = 1
    except checkpoint.StorageError as exc:
        print(f"hpcdist-train: error: {exc.strerror}", file=sys.stderr, flush=True)
        runfiles.record_rank_error(opts.run_dir, os.environ, exc.strerror, "storage", EXIT_STORAGE, exc.errno)
        status = EXIT_STORAGE
    except KeyboardInterrupt:  # a user's Ctrl-C (train/preemption.py): a stop, not a failure
        print(f"hpcdist-train: interrupted (SIGINT) at step {beat.step}, exit {EXIT_INTERRUPTED}: rerun with --resume "
              f"to go on from {checkpoint.resumes_from(opts.run_dir / vocab.CHECKPOINTS)}", file=sys.stderr, flush=True)
        status = EXIT_INTERRUPTED
    except Exception as exc:
        # This rank's own error, for the job's report to lead with (hpc/failures reads RUN_DIR/errors/).
        runfiles.record_rank_error(opts.run_dir, os.environ, f"{type(exc).__name__}: {exc}", "exception", 1)
        raise
    finally:
        beat.finish({0: "done", EXIT_PREEMPTED: "stopped", EXIT_INTERRUPTED: "stopped"}.get(status, "failed"))
        preemption.restore()
    return status


def train(opts: Options, beat: heartbeat.Heartbeat) -> int:
    """Set up, join the job, build, train, finish: each a function below, in this order."""
    run = set_up(opts, beat)
    data = load_dataset(opts, run.env)  # before any collective, so bad input fails every rank alike and fast
    join(run, beat)
    if opts.preflight_only:
        return leave(0)
    store = snapshot.open_store(run.run_dir, os.environ, every_s=run.snapshot_every_s, rank=run.rank,
                                local_rank=run.env.local_rank, fresh=not opts.resume, on_written=beat.snapshot_written,
                                persist=snapshot.Persist(run.checkpoints, opts.persist_every_s),
                                partitioned_on_node=run.env.node_rank if run.ds_config is not None else None)
    start = locate(run, store)  # before the engine: what it could not load is refused without building it
    engine = build_engine(run)
    beat.mark("model_built")
    heartbeat.time_ddp_buckets(getattr(engine, "net", None), beat.step_clock)
    loader = build_loader(run, engine, data)
    state, found = resume(run, engine, *start)
    timing = loop(run, engine, loader, state, found, beat, store)
    if timing is not None:
        beat.phase("eval")
        finish(run, engine, data, state, timing, store)
    if store is not None:
        store.drop()
    return leave(EXIT_PREEMPTED if timing is None else 0)


def set_up(opts: Options, beat: heartbeat.Heartbeat) -> Setup:
    """This rank's place, threads, device, precision and batch; no collective yet."""
    env = ranks.resolve(os.environ)
    make_run_dir(opts.run_dir)
    beat.identify(env, os.environ)
    beat.watch(watchdog.Watchdog(beat, timeout_s=opts.hang_timeout_s, factor=opts.hang_factor))
    if opts.backend == "dp" and env.distributed:
        raise UsageError(f"--backend dp is one process driving all of its node's GPUs, but this is rank {env.rank} "
                         f"of {env.world_size} (from {env.source}); launch a single process, or use --backend ddp")
    if opts.backend == "deepspeed":
        prepare_deepspeed_environment(os.environ, cuda=torch.cuda.is_available())
    # Ranks sharing a node split its CPUs; two ranks at two threads each on two cores run up to 44% slower.
    threads = opts.threads or ranks.threads_per_rank(os.environ, len(os.sched_getaffinity(0)), env)
    torch.set_num_threads(threads)
    device = pick_device(opts.backend, env)
    beat.peak_memory = lambda: peak_memory_bytes(device)
    if device.type == "cuda":
        # The batch shape never changes, so cuDNN's one-off search for the fastest conv kernels pays back.
        torch.backends.cudnn.benchmark = True
    precision, ds_config, global_batch = precision_and_config(opts, device, env.world_size)
    if precision == "fp16" and device.type == "cpu":
        if ds_config is not None and not cpu_has_fp16():
            raise UsageError("DeepSpeed trains fp16 on a CPU only where oneDNN has fp16 kernels (AVX512-FP16 or "
                             "AMX), and this CPU has none; pass --precision bf16 (or fp32)")
        warn(env.rank, "fp16 on CPU runs ~35x slower than bf16 there; pass --precision bf16 (or fp32) on CPU")
    if global_batch % env.world_size:
        raise UsageError(f"global batch {global_batch} does not split over {env.world_size} ranks; "
                         f"pass --batch-size with a multiple of {env.world_size}")
    run = Setup(opts, env, device, precision, ds_config, global_batch, threads)
    earlier = [] if opts.resume else checkpoint.earlier_run(run.checkpoints)
    if earlier:
        # Started, its checkpoints would be pruned against the earlier run's later steps, which a --resume takes.
        raise UsageError(f"{run.checkpoints} holds {earlier[-1]} of an earlier run: pass --resume to go on from it, "
                         f"or give another --run-dir (or move {run.checkpoints} away) to start afresh")
    return run


def join(run: Setup, beat: heartbeat.Heartbeat) -> None:
    """Join the job's process group, checking first (--preflight) that every rank can reach the others."""
    opts, env, device = run.opts, run.env, run.device
    checking = opts.preflight or opts.preflight_only
    if checking and run.world > 1:
        if device.type == "cuda":
            log_nccl_for_preflight(os.environ, run.run_dir)
        reach_master(env, min(opts.timeout_s, 120.0))
    beat.phase("rendezvous")
    comm = "none" if opts.backend == "dp" else init_process_group(opts.backend, env, device, opts.timeout_s)
    if opts.backend == "dp" and device.type == "cpu":
        say(run.rank, "dp: no GPU visible, so training the plain module on CPU (DataParallel needs GPUs)")
    beat.mark("process_group_ready")
    beat.phase("build")
    say(run.rank, f"{opts.backend} | world {run.world} ({env.source}) | {comm} on {device.type} | {run.precision} | "
                  f"global batch {run.global_batch} | {run.threads} threads per rank | "
                  + (f"master {env.master_addr}:{env.master_port}" if run.world > 1 else "one process: no master port"))
    if checking and run.world == 1:
        say(run.rank, f"preflight: one process, so no collective to check ({comm})")
    elif checking:
        preflight(env, device, run.run_dir)
        say(run.rank, f"preflight: all_reduce over {run.world} ranks summed to {run.world} ({comm})")


def build_engine(run: Setup) -> Engine:
    """The model on its device behind the backend's engine; every rank builds identical initial weights."""
    opts = run.opts
    torch.manual_seed(opts.seed)
    model = ConvNet().to(run.device)
    if run.ds_config is not None:
        if opts.compile or opts.channels_last:
            warn(run.rank, "--compile and --channels-last apply to dp/ddp; DeepSpeed trains the module as it is")
        return DeepSpeedEngine(model, config=run.ds_config)
    return TorchEngine(model, backend=opts.backend, device=run.device, precision=run.precision,
                       lr=opts.lr or 1e-3, world_size=run.world, compile=opts.compile,
                       channels_last=opts.channels_last)


def build_loader(run: Setup, engine: Engine, data: Dataset) -> ResidentLoader | ClassicLoader:
    opts = run.opts
    common = dict(rank=run.rank, world_size=run.world, local_batch=run.global_batch // run.world, seed=opts.seed,
                  device=run.device, augment=opts.augment)
    if opts.loader == "resident":
        # Normalising straight into the engine's input dtype saves a cast per step.
        loader = ResidentLoader(data.train, dtype=engine.input_dtype, **common)
    else:
        loader = ClassicLoader(data.train, num_workers=opts.num_workers, **common)
    if loader.steps_per_epoch < 1:
        raise UsageError(f"{len(data.train)} training images make no full global batch of {run.global_batch}; "
                         "pass a smaller --batch-size or a larger --synthetic-size")
    return loader


def locate(run: Setup, store: snapshot.Store | dssnapshot.Parts | None) -> tuple[Path | None, tuple | None, str]:
    """With --resume, what the run goes on from (a disk checkpoint, perhaps made of DeepSpeed's snapshot parts, or a
    snapshot's state and where a node held it, and which memory); refused where this run cannot load it."""
    if not run.opts.resume:
        return None, None, ""
    found = checkpoint.choose(run.checkpoints, rank=run.rank, say=lambda line: say(run.rank, line),
                              share=lambda name: broadcast_from_0(name, run.world))
    if isinstance(store, dssnapshot.Parts):  # DeepSpeed's parts, made a checkpoint on disk to load as one
        found, source = dssnapshot.assemble(store, run.checkpoints, run.rank, run.world, found, run.ds_config)
        return found, None, source
    held = snapshot.newest_held(store, run.rank, run.world, snapshot.step_of(found))
    if held is None and found is not None:
        checkpoint.check_loadable(found, run.opts.backend, run.ds_config)
    return found, held, "node memory" if held is not None else ""


def resume(run: Setup, engine: Engine, found: Path | None, held: tuple | None, source: str) -> tuple[dict, Path | None]:
    """The trainer's own state (step, losses, what the data order depends on), and with --resume the disk
    checkpoint it came from (None when it came from a snapshot, which is no checkpoint a stop can stand on)."""
    state = {"step": 0, "first_loss": None, "last_loss": None, "global_batch": run.global_batch,
             "seed": run.opts.seed, "lr": engine.lr, "backend": run.opts.backend, "world_size": run.world}
    if found is None and held is None:
        if run.opts.resume:
            say(run.rank, f"resume: no complete checkpoint in {run.checkpoints}, so starting from step 0")
        return state, None
    saved, where = (engine.restore(*held), held[1]) if held is not None else (engine.read(found, run.rank), found)
    for key, flag in (("global_batch", "--batch-size"), ("seed", "--seed"), ("lr", "--lr")):
        if saved.get(key, state[key]) != state[key]:
            raise UsageError(f"{where} was written with {key} {saved[key]}, this run has {state[key]}; resume with "
                             f"{flag} {saved[key]}, as the uninterrupted run had")
    state.update(step=saved["step"], first_loss=saved["first_loss"], last_loss=saved["last_loss"])
    say(run.rank, f"resumed from {where} at step {state['step']}" + (f" (a snapshot in {source})" if source else "")
        + checkpoint.regrouped(saved.get("world_size"), run.world, run.global_batch))
    return state, None if held is not None else found


def loop(run: Setup, engine: Engine, loader: ResidentLoader | ClassicLoader, state: dict, found: Path | None,
         beat: heartbeat.Heartbeat, store: snapshot.Store | dssnapshot.Parts | None) -> Timing | None:
    """Train to the last step, logging, checkpointing, snapshotting; None when a signal stopped it after a save."""
    opts, rank, world = run.opts, run.rank, run.world
    total_steps = min(opts.epochs * loader.steps_per_epoch, opts.max_steps or float("inf"))
    resumed_at = state["step"] if found is not None else None
    clocks = Clocks(preemption.WallClock(opts.checkpoint_every_min * 60),
                    preemption.WallClock(run.snapshot_every_s))

    def save() -> Path:
        beat.phase("checkpoint")
        where = checkpoint.save(run.checkpoints, state["step"], rank=rank, agree=checkpoint.Agreement.of_every_rank(),
                                write=lambda save_dir, tag: engine.write(save_dir, tag, rank, dict(state)),
                                trained_with=engine.trained_with)
        clocks.saved()
        beat.phase("train")
        return where

    def stop() -> None:
        announce_stop(run, state["step"], save() if resumed_at != state["step"] else found)

    timing = Timing(start_step=state["step"], warm_step=state["step"] + opts.warmup_steps)
    beat.plan(total_steps=total_steps, local_batch=run.global_batch // world, step=timing.start_step)
    agreement = preemption.Agreement(world, run.device, beat.step_clock.waited)
    # A signal during set-up: agree now, not after a step (the launcher's SIGKILL may be 30 s away).
    if agreement.now(preemption.received() is not None)[0]:
        stop()
        return None
    opened = fileio.open_own(run.run_dir / vocab.METRICS, append=bool(state["step"])) if rank == 0 else None
    with opened if opened is not None else contextlib.nullcontext() as metrics:
        hooks = StepHooks(run, beat, timing, total_steps, state, agreement, clocks, metrics,
                          loader.steps_per_epoch, started=STARTED)
        batches = loader.batches(timing.start_step)
        beat.phase("train")
        beat.step_clock.begin()
        while state["step"] < total_steps:
            batch = next(batches)
            loss = engine.train_step(batch.x, batch.y)
            state["step"] = batch.step + 1
            action = hooks.after(batch, loss)
            if action == "stop":
                stop()
                return None
            if action == "save":
                save()
            elif action == "snapshot":
                snapshot.take(store, engine, dict(state), rank,
                              pace=clocks.snapshot if opts.snapshot_every_s is None else None)
                clocks.saved(snapshot_only=True)
    agreement.drain()
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)  # the rate must count the steps still queued on the GPU
    timing.ended = time.time()
    if state["step"] > timing.start_step:
        save()
    return timing


def announce_stop(run: Setup, step: int, where: Path | None) -> None:
    """Every rank checkpointed at ``step`` after a stop signal: say so, and leave rank 0's marker."""
    if run.rank == 0:
        # What the batch shell's requeue.sh acts on: the step's own exit status can't say it, since
        # srun --kill-on-bad-exit may kill the ranks that exit 75 a moment after the first.
        fileio.atomic_write(run.run_dir / vocab.PREEMPTED, f"{step}\n")
    name = signal.Signals(preemption.received() or signal.SIGTERM).name
    say(run.rank, f"stopped by {name} at step {step}: checkpoint {where} written by all ranks; "
                  f"exit {EXIT_PREEMPTED}, rerun with --resume")


def finish(run: Setup, engine: Engine, data: Dataset, state: dict, timing: Timing,
           store: snapshot.Store | dssnapshot.Parts | None) -> None:
    """Test accuracy and every rank's parameter digest, gathered into rank 0's summary.json."""
    opts, rank, world, env = run.opts, run.rank, run.world, run.env
    accuracy = evaluate_accuracy(engine, data, rank, world, run.device)
    with engine.full_parameters() as named:
        digest = param_digest(named)
    mine = {"rank": rank, "local_rank": env.local_rank, "node_rank": env.node_rank, "hostname": socket.gethostname(),
            "master_addr": env.master_addr, "master_port": env.master_port if world > 1 else None,
            "peak_memory_bytes": peak_memory_bytes(run.device), "param_digest": digest}
    everyone = gathered(mine, world)
    if rank != 0:
        return
    # Steps up to --warmup-steps pay for start-up, autotuning and compiling, so they are left out of the rate.
    timed = state["step"] - timing.warm_step if timing.warm_at is not None else 0
    summary = {"backend": opts.backend, "world_size": world, "zero_stage": engine.zero_stage,
               "precision": run.precision, "steps": state["step"], "final_loss": state["last_loss"],
               "first_loss": state["first_loss"], "test_accuracy": accuracy,
               "images_per_s": timed * run.global_batch / (timing.ended - timing.warm_at) if timed > 0 else None,
               "warmup_steps": opts.warmup_steps, "device": device_name(run.device),
               "wall_s": time.time() - STARTED, "ranks": everyone, **snapshot.stats(store),
               "time_to_first_step_s": timing.first_step_at - STARTED if timing.first_step_at else None}
    path = run.run_dir / vocab.SUMMARY
    fileio.atomic_write(path, json.dumps(summary, indent=2) + "\n")
    say(rank, f"done: {state['step']} steps, final loss {state['last_loss']:.4f}, test accuracy "
              f"{accuracy:.3f}, {summary['images_per_s'] or 0:.0f} images/s; summary in {path}")


def cli() -> None:
    """``python -m train`` and the ``hpcdist-train`` console script: main(), then leave at once.

    Everything is written and closed by the time main() returns. Skipping the interpreter's teardown avoids a race
    seen now and then on rank 0 of env:// jobs: a c10d store thread still joinable while C++ static destructors run
    aborts the finished process ("terminate called without an active exception", exit -6) after it reported success.
    """
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    cli()
