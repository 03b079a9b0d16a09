"""Specifications of train/stephooks.py: what follows each step, on one rank (world 1) with stand-ins for the
heartbeat and the stop vote."""

from __future__ import annotations

import contextlib
import io
import json
from types import SimpleNamespace

import torch

from train.stephooks import Clocks, StepHooks, Timing


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
    """The agreement of one rank: returns what it was given one exchange earlier, and a stop from stop_after on."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.calls, self.stop_after, self.cast = 0, stop_after, []

    def exchange(self, stop: bool, due: int) -> tuple[bool, int]:
        self.calls += 1
        self.cast.append(due)
        return self.stop_after is not None and self.calls >= self.stop_after, self.cast[-2] if len(self.cast) > 1 else 0


class Clock:
    """A WallClock stand-in that is due at the calls listed."""

    def __init__(self, due_at=()) -> None:
        self.calls, self.due_at, self.saves = 0, set(due_at), 0

    def due(self) -> bool:
        self.calls += 1
        return self.calls in self.due_at

    def saved(self) -> None:
        self.saves += 1


def hooks(total: int, vote: Vote, metrics=None, log_every: int = 0, checkpoint_every: int = 0, clocks=None):
    run = SimpleNamespace(opts=SimpleNamespace(log_every=log_every, checkpoint_every=checkpoint_every), rank=0,
                          world=1, global_batch=8)
    state = {"step": 0, "last_loss": None, "first_loss": None}
    beat = Beat()
    made = StepHooks(run, beat, Timing(start_step=0, warm_step=1), total, state, vote,
                     clocks or Clocks(Clock(), Clock()), metrics, steps_per_epoch=4, started=0.0)
    return made, state, beat


def step(made: StepHooks, state: dict, n: int):
    state["step"] = n
    return made.after(SimpleNamespace(epoch=(n - 1) // 4, index=(n - 1) % 4), torch.tensor(2.0 - n / 10))


def test_a_checkpoint_is_called_for_at_its_interval_but_never_at_the_last_step():
    made, state, beat = hooks(10, Vote(), checkpoint_every=5)
    actions = [step(made, state, n) for n in range(1, 11)]
    assert actions == [None] * 4 + ["save"] + [None] * 5
    assert beat.stepped_at == list(range(1, 11)) and "first_step_done" in beat.marks


def test_rank_0_s_clocks_call_for_a_snapshot_or_a_checkpoint_one_step_later():
    clocks = Clocks(checkpoint=Clock(due_at={6}), snapshot=Clock(due_at={2}))
    made, state, _ = hooks(10, Vote(), clocks=clocks)
    actions = [step(made, state, n) for n in range(1, 11)]
    assert actions == [None, None, "snapshot", None, None, None, "save", None, None, None]
    # a due checkpoint is the stronger vote: the snapshot clock is not asked at that step
    assert clocks.snapshot.calls == 9


def test_no_snapshot_is_taken_at_the_last_step():
    made, state, _ = hooks(3, Vote(), clocks=Clocks(Clock(), Clock(due_at={2})))
    assert [step(made, state, n) for n in (1, 2, 3)] == [None, None, None]


def test_a_checkpoint_resets_both_clocks_and_a_snapshot_only_its_own():
    clocks = Clocks(Clock(), Clock())
    clocks.saved()
    clocks.saved(snapshot_only=True)
    assert (clocks.checkpoint.saves, clocks.snapshot.saves) == (1, 2)


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
