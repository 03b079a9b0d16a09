"""hpc.vocab is the one source of the shared words: the CLI, the trainer and the job layout read it."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest

from hpc import spec, speccheck, vocab
from train.options import parser

REPO = Path(__file__).resolve().parent.parent


def choices(flag: str) -> tuple:
    action = next(a for a in parser()._actions if flag in a.option_strings)
    return tuple(action.choices)


def test_trainer_choices_are_the_vocabulary() -> None:
    assert choices("--backend") == vocab.BACKENDS
    assert choices("--precision") == vocab.PRECISIONS
    assert choices("--zero-stage") == vocab.ZERO_STAGES
    assert choices("--loader") == vocab.LOADERS
    assert choices("--dataset") == vocab.DATASETS


def test_job_spec_accepts_the_vocabulary_plus_auto() -> None:
    assert speccheck.BACKENDS == (*vocab.BACKENDS, "auto")
    assert set(vocab.VALID_LAUNCHERS) == set(vocab.BACKENDS)
    assert all(set(ls) <= set(vocab.LAUNCHERS) for ls in vocab.VALID_LAUNCHERS.values())
    assert spec.JobSpec(job_dir="/j").job_name == vocab.DEFAULT_JOB_NAME


def test_log_names_follow_slurm_patterns() -> None:
    assert vocab.task_log(3) == "logs/task-3.log" and vocab.batch_log("42") == "logs/batch-42.out"
    assert vocab.TASK_LOG.startswith(vocab.LOGS_DIR + "/") and vocab.BATCH_LOG.startswith(vocab.LOGS_DIR + "/")


def test_vocab_imports_nothing() -> None:
    tree = ast.parse((REPO / "hpc" / "vocab.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_warnings_from_our_code_are_errors_and_others_stay_warnings() -> None:
    with pytest.raises(UserWarning):
        warnings.warn_explicit("ours", UserWarning, "hpc/spec.py", 1, module="hpc.spec")
    with pytest.raises(UserWarning):
        warnings.warn_explicit("ours", UserWarning, "train/options.py", 1, module="train.options")
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("theirs", UserWarning, "x.py", 1, module="hpcx.other")
    assert [str(w.message) for w in caught] == ["theirs"]


def test_every_heartbeat_phase_the_trainer_names_is_in_exactly_one_group() -> None:
    groups = (vocab.SETUP_PHASES, vocab.ACTIVE_PHASES, vocab.FINAL_PHASES)
    assert sorted(vocab.PHASES) == sorted({p for g in groups for p in g}) and len(vocab.PHASES) == sum(map(len, groups))
    named = set()
    for path in (REPO / "train").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("phase", "finish"):
                named |= {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    assert named and named <= set(vocab.PHASES) and set(vocab.FINAL_PHASES) <= named
