"""Specifications of train/stephooks.py: what follows each step, on one rank (world 1) with stand-ins for the
heartbeat and the stop vote."""

from __future__ import annotations

import contextlib
import io
import json
from types import SimpleNamespace

import torch

from train.stephooks import StepHooks, Timing


class Beat:
    def __init__(self) -> None:
        self.stepped_at: list[int] = []
        self.marks: dict[str, float] = {}
        self.step_clock = SimpleNamespace(waited=contextlib.nullcontext)

    def stepped(self, step: int, loss) -> None:
        self.stepped_at.append(step)

    def mark(self, name: str, at: float) -> None:
        self.marks[name] = at


class Vote:
    def __init__(self, stop_after: int | None = None) -> None:
        self.calls, self.stop_after = 0, stop_after

    def exchange(self, stop: bool, checkpoint: bool) -> tuple[bool, bool]:
        self.calls += 1
        return self.stop_after is not None and self.calls >= self.stop_after, False


def hooks(total: int, vote: Vote, metrics=None, log_every: int = 0, checkpoint_every: int = 0):
    run = SimpleNamespace(opts=SimpleNamespace(log_every=log_every, checkpoint_every=checkpoint_every), rank=0,
                          world=1, global_batch=8)
    state = {"step": 0, "last_loss": None, "first_loss": None}
    beat = Beat()
    made = StepHooks(run, beat, Timing(start_step=0, warm_step=1), total, state, vote,
                     SimpleNamespace(due=lambda: False), metrics, steps_per_epoch=4, started=0.0)
    return made, state, beat


def step(made: StepHooks, state: dict, n: int):
    state["step"] = n
    return made.after(SimpleNamespace(epoch=(n - 1) // 4, index=(n - 1) % 4), torch.tensor(2.0 - n / 10))


def test_a_checkpoint_is_called_for_at_its_interval_but_never_at_the_last_step():
    made, state, beat = hooks(10, Vote(), checkpoint_every=5)
    actions = [step(made, state, n) for n in range(1, 11)]
    assert actions == [None] * 4 + ["save"] + [None] * 5
    assert beat.stepped_at == list(range(1, 11)) and "first_step_done" in beat.marks


def test_every_rank_stops_on_the_step_the_vote_says():
    made, state, _ = hooks(100, Vote(stop_after=3))
    assert [step(made, state, n) for n in (1, 2, 3)] == [None, None, "stop"]


def test_the_loss_is_recorded_at_the_logged_steps_and_the_first_and_last():
    out = io.StringIO()
    made, state, _ = hooks(7, Vote(), metrics=out, log_every=3)
    for n in range(1, 8):
        step(made, state, n)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["step"] for r in lines] == [1, 3, 6, 7]
    assert state["first_loss"] == lines[0]["loss"] and state["last_loss"] == lines[-1]["loss"]
    assert (lines[0]["epoch"], lines[0]["batch"]) == (0, 1)
