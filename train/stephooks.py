"""What follows every training step, in one place: the timing marks, the loss logged and recorded, the
heartbeat, and the one-step-late stop vote with the checkpoint or snapshot it may call for.

    hooks = StepHooks(run, beat, timing, total_steps, state, agreement, clocks, metrics, steps_per_epoch, STARTED)
    while state["step"] < total_steps:
        ...train one step...
        action = hooks.after(batch, loss)    # "stop", "save", "snapshot" or None

Nothing here waits for the device on an ordinary step: a loss is read only at the steps it is logged.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import IO, Any

from train import preemption
from train.runtime import all_mean, say

# Without --log-every: a loss line printed every PRINT_EVERY steps, and metrics.jsonl (the report's loss
# curve) at least CURVE_POINTS lines a run, a mean over the ranks each (a collective: a bounded number).
PRINT_EVERY = 100
CURVE_POINTS = 50


@dataclass(frozen=True)
class Clocks:
    """Rank 0's wall clocks: disk checkpoints every --checkpoint-every-min, snapshots every --snapshot-every-s."""

    checkpoint: preemption.WallClock
    snapshot: preemption.WallClock

    def due(self) -> int:
        return (preemption.CHECKPOINT if self.checkpoint.due() else
                preemption.SNAPSHOT if self.snapshot.due() else 0)

    def saved(self, snapshot_only: bool = False) -> None:
        """A checkpoint resets both clocks (the state is safe at that step); a snapshot only its own."""
        if not snapshot_only:
            self.checkpoint.saved()
        self.snapshot.saved()


@dataclass
class Timing:
    """Wall-clock marks of the training loop, for summary.json's rates."""

    start_step: int
    warm_step: int
    first_step_at: float | None = None
    warm_at: float | None = None
    ended: float = 0.0


class StepHooks:
    """Called once after each step with its batch and (undetached, unread) loss."""

    def __init__(self, run: Any, beat: Any, timing: Timing, total_steps: int, state: dict,
                 agreement: preemption.Agreement, clocks: Clocks, metrics: IO[str] | None,
                 steps_per_epoch: int, started: float) -> None:
        self.run, self.beat, self.timing, self.total, self.state = run, beat, timing, total_steps, state
        self.agreement, self.clocks, self.metrics = agreement, clocks, metrics
        self.steps_per_epoch, self.started = steps_per_epoch, started
        log_every = run.opts.log_every
        self.print_every = log_every or PRINT_EVERY
        self.record_every = log_every or max(1, min(PRINT_EVERY, total_steps // CURVE_POINTS))
        self.last_log_time, self.last_log_step = time.time(), timing.start_step

    def after(self, batch: Any, loss: Any) -> str | None:
        """"stop" when every rank agreed to stop (a signal), "save" when a checkpoint is due, "snapshot" when a
        snapshot is, else None."""
        step = self.state["step"]
        self._mark(step, loss)
        if step % self.record_every == 0 or step == self.total or step == 1:
            self._record(step, batch, loss)
        self.beat.stepped(step, loss)
        # Votes cast after this step are read after the next one: no per-step wait for the device.
        stopping, due = self.agreement.exchange(preemption.received() is not None,
                                                self.clocks.due() if self.run.rank == 0 else 0)
        if stopping:
            return "stop"
        every = self.run.opts.checkpoint_every
        if step >= self.total:
            return None
        if due == preemption.CHECKPOINT or every and step % every == 0:
            return "save"
        return "snapshot" if due == preemption.SNAPSHOT else None

    def _mark(self, step: int, loss: Any) -> None:
        timing = self.timing
        if timing.first_step_at is None:
            float(loss)  # waits for the device, so the time covers the whole first step
            timing.first_step_at = time.time()
            self.beat.mark("first_step_done", timing.first_step_at)
        if step == timing.warm_step:
            float(loss)
            timing.warm_at = time.time()

    def _record(self, step: int, batch: Any, loss: Any) -> None:
        """The loss averaged over the ranks (a collective), printed and, on rank 0, added to metrics.jsonl."""
        run, state = self.run, self.state
        with self.beat.step_clock.waited():
            state["last_loss"] = value = all_mean(loss, run.world)
        if state["first_loss"] is None:
            state["first_loss"] = value
        now = time.time()
        images_per_s = (step - self.last_log_step) * run.global_batch / max(now - self.last_log_time, 1e-9)
        self.last_log_time, self.last_log_step = now, step
        if step % self.print_every == 0 or step == self.total or step == 1:
            say(run.rank, f"Epoch: {batch.epoch} | Batch: {batch.index + 1}/{self.steps_per_epoch} | "
                          f"Loss: {value:.4f}")
        if self.metrics:
            self.metrics.write(json.dumps({"step": step, "epoch": batch.epoch, "batch": batch.index + 1,
                                           "loss": value, "images_per_s": round(images_per_s, 1),
                                           "time_s": round(now - self.started, 3)}) + "\n")
            self.metrics.flush()
