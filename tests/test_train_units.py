"""The trainer's parts, one process: model, data, loader, checkpoints, DeepSpeed config and refusals."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import pickletools
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc import checkpoints
from train import checkpoint, nodebeat, runtime
from train import data as data_module
from train.__main__ import main
from train.data import DataError, read_batch, read_cifar10, synthetic
from train.engines import TorchEngine
from train.loader import ClassicLoader, ResidentLoader, epoch_permutation, normalize, shard
from train.model import ConvNet, param_digest

pytestmark = pytest.mark.timed  # heartbeats, watchdogs and signals in real threads, bounded in seconds

REPO = Path(__file__).resolve().parents[1]
SRUN_RANK_1_OF_2 = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_NODEID": "0",
                    "SLURM_STEP_ID": "0", "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "localhost",
                    "SLURM_JOB_ID": "777"}


# --- model ---------------------------------------------------------------------------------------------

def test_convnet_maps_cifar_images_through_2304_and_128_features_to_10_logits():
    net = ConvNet()
    assert net.fc1.in_features == 64 * 6 * 6 == 2304 and net.fc1.out_features == 128
    assert net.fc2.out_features == 10
    assert net(torch.zeros(5, 3, 32, 32)).shape == (5, 10)
    # conv1 896 + conv2 18,496 + fc1 295,040 + fc2 1,290
    assert sum(p.numel() for p in net.parameters()) == 315_722


def test_a_dataparallel_checkpoint_with_module_prefixes_loads_into_a_plain_module():
    torch.manual_seed(1)
    saved = ConvNet()
    wrapped_keys = torch.nn.DataParallel(saved).state_dict()
    assert all(k.startswith("module.") for k in wrapped_keys)
    plain = ConvNet()
    engine = TorchEngine(plain, backend="ddp", device=torch.device("cpu"), precision="fp32", lr=1e-3)
    engine.restore({**engine.state({}), "model": wrapped_keys})
    assert param_digest(plain.named_parameters()) == param_digest(saved.named_parameters())
    engine.restore({**engine.state({}), "model": saved.state_dict()})  # and unprefixed keys load too


def test_with_channels_last_the_module_sees_channels_last_images_and_learns_what_it_would_contiguous():
    seen, losses = [], []
    for channels_last in (False, True):
        torch.manual_seed(3)
        net = ConvNet()
        net.conv1.register_forward_pre_hook(
            lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        engine = TorchEngine(net, backend="ddp", device=torch.device("cpu"), precision="fp32", lr=1e-3,
                             channels_last=channels_last)
        x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
        losses.append([engine.train_step(x, y).item() for _ in range(3)])
        engine.predict(x)
    assert seen == [False] * 4 + [True] * 4
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_param_digest_sees_any_change_and_ignores_wrapper_prefixes():
    net = ConvNet()
    named = list(net.named_parameters())
    assert param_digest(named) == param_digest([(f"module.{n}", p) for n, p in reversed(named)])
    before = param_digest(named)
    with torch.no_grad():
        net.fc2.bias[3] += 1e-7
    assert param_digest(net.named_parameters()) != before


# --- data ----------------------------------------------------------------------------------------------

class Python2Pickler(pickle._Pickler):
    """Pickles as CIFAR-10's batches were written: Python 2's cPickle, protocol 2, its strings byte strings, and
    numpy 1's arrays rebuilt by numpy.core.multiarray._reconstruct (numpy 2 names numpy._core)."""

    dispatch = dict(pickle._Pickler.dispatch)
    reconstruct = np.zeros(0).__reduce__()[0]

    def save_python2_str(self, obj: bytes | str) -> None:
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        self.write((pickle.SHORT_BINSTRING + bytes([len(raw)]) if len(raw) < 256
                    else pickle.BINSTRING + len(raw).to_bytes(4, "little")) + raw)
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = save_python2_str

    def save_global(self, obj, name=None) -> None:
        if obj is not self.reconstruct:
            return super().save_global(obj, name)
        self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
        self.memoize(obj)


def dump_like_cifar(batch: dict, path) -> None:
    with open(path, "wb") as f:
        Python2Pickler(f, protocol=2).dump(batch)


def write_cifar_batch(path, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(x) for x in rng.integers(0, 10, size=n)]
    dump_like_cifar({b"batch_label": b"test", b"labels": labels, b"data": data, b"filenames": [b"x"] * n}, path)
    return data, labels


def write_cifar10(root, per_batch: int = 6) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {name: write_cifar_batch(folder / name, per_batch, i)
               for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])}
    return written


def test_cifar10_reader_reads_the_real_pickle_format_channel_major(tmp_path):
    written = write_cifar10(tmp_path)
    data = read_cifar10(tmp_path)
    assert data.train.images.shape == (30, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (6, 3, 32, 32)
    raw, labels = written["data_batch_2"]
    # row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major over 32 x 32
    assert data.train.images[6, 1, 2, 5].item() == raw[0, 1024 + 2 * 32 + 5]
    assert data.train.labels[6:12].tolist() == labels
    assert read_cifar10(tmp_path / "cifar-10-batches-py").test.labels.tolist() == written["test_batch"][1]


def test_the_cifar10_reader_looks_up_exactly_the_globals_the_real_batches_name(tmp_path):
    write_cifar_batch(tmp_path / "data_batch_1", 2, seed=0)
    named = {tuple(arg.split(" ")) for op, arg, _ in pickletools.genops((tmp_path / "data_batch_1").read_bytes())
             if op.name == "GLOBAL"}
    assert named == set(data_module.CIFAR_GLOBALS)
    assert read_batch(tmp_path / "data_batch_1").images.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("planted", ["python3", "python2"])
def test_a_cifar10_batch_whose_pickle_calls_code_runs_none_and_exits_2_in_one_line(tmp_path, capsys, one_process,
                                                                                   planted):
    write_cifar10(tmp_path / "data")
    marker, batch = tmp_path / "ran", tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1"
    if planted == "python3":
        batch.write_bytes(pickle.dumps({b"data": RunsCode(marker), b"labels": [0]}))
    else:  # as a Python 2 pickle names it: the unpickler maps __builtin__ to builtins
        batch.write_bytes(b"\x80\x02c__builtin__\nopen\nU" + bytes([len(str(marker))]) + str(marker).encode()
                          + b"U\x01w\x86R.")
    code = main(["--backend", "ddp", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                 "--run-dir", str(tmp_path / "run"), "--threads", "1", "--heartbeat-s", "0"])
    err = capsys.readouterr().err.strip()
    assert not marker.exists()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "data_batch_1" in err and "open" in err and "not read" in err and "--data-dir" in err, err


def test_a_missing_cifar10_file_is_one_line_naming_the_path_and_download(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError) as err:
        read_cifar10(tmp_path)
    message = str(err.value)
    assert "data_batch_3" in message and "--download" in message and "\n" not in message


def test_a_pipe_where_a_cifar10_batch_belongs_is_refused_in_one_line_not_waited_on_forever(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.unlink()
    os.mkfifo(batch)
    said = []

    def read() -> None:
        with pytest.raises(DataError) as err:
            read_cifar10(tmp_path)
        said.append(str(err.value))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    waited = reader.is_alive()
    if waited:  # a writer lets the reader's open return
        os.close(os.open(batch, os.O_WRONLY))
    assert not waited, "the reader waited for someone to write into the pipe"
    [message] = said
    assert f"{batch} is a pipe, not a file" in message and "--data-dir" in message and "\n" not in message


def test_a_data_dir_that_is_a_file_is_named_as_such_not_as_a_corrupt_batch_to_delete(tmp_path):
    (tmp_path / "data").write_text("not a folder\n")
    with pytest.raises(DataError) as err:
        read_cifar10(tmp_path / "data")
    assert str(err.value).startswith(f"--data-dir {tmp_path / 'data'} is not a folder"), err.value
    assert "delete" not in str(err.value) and (tmp_path / "data").read_text() == "not a folder\n"


def test_a_corrupt_cifar10_run_exits_2_with_one_line_on_stderr(tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    write_cifar10(tmp_path / "data")
    (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x04truncated")
    rc = main(["--backend", "ddp", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
               "--run-dir", str(tmp_path / "run"), "--threads", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "test_batch" in err and "corrupt" in err


def test_a_batch_of_the_wrong_shape_is_refused(tmp_path):
    dump_like_cifar({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, tmp_path / "bad")
    with pytest.raises(DataError, match="not uint8 N x 3072"):
        read_batch(tmp_path / "bad")


@pytest.mark.parametrize("labels,words", [
    ([3.7, 1.2], "not integers 0-9"), ([b"1", b"2"], "not integers 0-9"), ([True, False], "not integers 0-9"),
    ([2**70, 1], "not integers 0-9"), ([float("nan"), 1], "not integers 0-9"), (None, "labels of shape ()"),
    (3, "labels of shape ()"), ([[1, 2], [3, 4]], "labels of shape (2, 2)"), ([[1], [1, 2]], "ragged"),
])
def test_labels_that_are_not_one_integer_0_9_per_image_are_refused_never_cast(tmp_path, labels, words):
    dump_like_cifar({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}, tmp_path / "bad")
    with pytest.raises(DataError) as err:
        read_batch(tmp_path / "bad")
    assert words in str(err.value) and "\n" not in str(err.value)


def test_an_empty_test_batch_is_refused_before_training_not_divided_by_after_it(tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HPCDIST_HEARTBEAT_STAGE", str(tmp_path / "stage"))
    write_cifar10(tmp_path / "data")
    write_cifar_batch(tmp_path / "data" / "cifar-10-batches-py" / "test_batch", 0, seed=0)
    rc = main(["--backend", "ddp", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
               "--run-dir", str(tmp_path / "run"), "--batch-size", "6", "--max-steps", "1", "--threads", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "test_batch holds no images" in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_synthetic_data_is_cifar_shaped_and_fixed_by_seed():
    data = synthetic(512, 128, seed=3)
    assert data.train.images.shape == (512, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (128, 3, 32, 32) and set(data.train.labels.tolist()) == set(range(10))
    assert torch.equal(synthetic(512, 128, seed=3).train.images, data.train.images)
    assert torch.equal(synthetic(512, 128, seed=3).test.labels, data.test.labels)
    assert not torch.equal(synthetic(512, 128, seed=4).train.images, data.train.images)


def test_synthetic_data_is_learnable_but_far_from_solved_after_a_few_dozen_steps():
    data = synthetic(1024, 512, seed=0)
    torch.manual_seed(0)
    net, x, y = ConvNet(), normalize(data.train.images), data.train.labels
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for step in range(32):
        batch = slice(step * 64 % 1024, step * 64 % 1024 + 64)
        loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        accuracy = (net(normalize(data.test.images)).argmax(1) == data.test.labels).float().mean().item()
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    assert 0.2 < accuracy < 0.8, accuracy  # 10 classes: chance is 0.1; the old set reached 1.0 here


# --- resident loader -----------------------------------------------------------------------------------

def test_rank_shards_are_disjoint_and_cover_the_epoch():
    order = epoch_permutation(100, seed=0, epoch=0)
    shards = [shard(order, r, 4) for r in range(4)]
    assert all(len(s) == 25 for s in shards)
    assert sorted(torch.cat(shards).tolist()) == list(range(100))


def test_uneven_shards_are_padded_so_every_rank_takes_the_same_number_of_steps():
    order = epoch_permutation(10, seed=0, epoch=0)
    shards = [shard(order, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert set(torch.cat(shards).tolist()) == set(range(10))


def test_each_epoch_draws_a_new_permutation_that_every_rank_agrees_on():
    assert torch.equal(epoch_permutation(50, 7, 0), epoch_permutation(50, 7, 0))
    assert not torch.equal(epoch_permutation(50, 7, 0), epoch_permutation(50, 7, 1))
    assert not torch.equal(epoch_permutation(50, 7, 0), epoch_permutation(50, 8, 0))


def resident(rank: int, **kw) -> ResidentLoader:
    return ResidentLoader(synthetic(64, 8, seed=0).train, rank=rank, world_size=2, local_batch=8, seed=5,
                          device=torch.device("cpu"), **kw)


def test_resident_loader_feeds_disjoint_normalised_batches_and_resumes_mid_epoch_exactly():
    loaders = [resident(0), resident(1)]
    assert loaders[0].steps_per_epoch == 4
    first_epoch = [[b for _, b in zip(range(4), loader.batches(0))] for loader in loaders]
    for a, b in zip(*first_epoch):
        assert not any(torch.equal(xa, xb) for xa in a.x for xb in b.x)
    assert abs(float(first_epoch[0][0].x.mean())) < 1.5 and first_epoch[0][0].x.dtype == torch.float32
    straight = [b for _, b in zip(range(7), resident(0).batches(0))]
    resumed = [b for _, b in zip(range(4), resident(0).batches(3))]
    assert [b.step for b in resumed] == [3, 4, 5, 6] and [b.epoch for b in resumed] == [0, 1, 1, 1]
    for a, b in zip(straight[3:], resumed):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


@pytest.mark.parametrize("workers", [0, 1])
def test_classic_loader_with_augment_resumes_mid_epoch_with_the_crops_and_flips_of_the_uninterrupted_run(workers):
    # A resume restores the global RNG as it was at the checkpoint; the DataLoader iterator made there draws from
    # it afresh, so what the augmentation draws must not hang on that stream.
    def batches(start: int, count: int, rng_seed: int) -> list:
        torch.manual_seed(rng_seed)
        loader = ClassicLoader(synthetic(64, 8, seed=0).train, rank=0, world_size=1, local_batch=8, seed=5,
                               device=torch.device("cpu"), augment=True, num_workers=workers)
        return [b for _, b in zip(range(count), loader.batches(start))]
    straight, resumed = batches(0, 11, rng_seed=1), batches(3, 8, rng_seed=2)
    assert [b.step for b in resumed] == list(range(3, 11))
    for a, b in zip(straight[3:], resumed):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_normalize_maps_each_channel_mean_to_zero_and_one_std_to_one():
    from train.loader import MEAN, STD

    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    one_std_up = mean + torch.tensor(STD).view(1, 3, 1, 1) * 255
    images = torch.cat([mean.expand(1, 3, 2, 2), one_std_up.expand(1, 3, 2, 2)])
    out = normalize(images)
    assert out.dtype == torch.float32
    assert torch.allclose(out[0], torch.zeros(3, 2, 2), atol=1e-5)
    assert torch.allclose(out[1], torch.ones(3, 2, 2), atol=1e-5)
    assert normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8), torch.bfloat16).dtype == torch.bfloat16


def test_resident_loader_hands_deepspeed_its_input_dtype_directly():
    fp32, bf16 = next(resident(0).batches(0)), next(resident(0, dtype=torch.bfloat16).batches(0))
    assert bf16.x.dtype == torch.bfloat16 and torch.equal(bf16.x, fp32.x.to(torch.bfloat16))


def test_augmentation_crops_and_flips_on_the_device_reproducibly_by_position():
    plain = next(resident(0).batches(2))
    once, again = next(resident(0, augment=True).batches(2)), next(resident(0, augment=True).batches(2))
    assert torch.equal(once.x, again.x) and once.x.shape == plain.x.shape
    assert not torch.equal(once.x, plain.x)


# --- checkpoints ---------------------------------------------------------------------------------------

def save_model(root, step: int, net: torch.nn.Module):
    return checkpoint.save(root, step, rank=0,
                           write=lambda save_dir, tag: torch.save(net.state_dict(), save_dir / tag / "model.pt"))


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path):
    root = tmp_path / "checkpoints"
    torch.manual_seed(0)
    good = ConvNet()
    save_model(root, 10, good)

    def crash_half_way(save_dir, tag):
        (save_dir / tag / "model.pt").write_bytes(b"half a file")
        raise RuntimeError("crashed mid-write")

    with pytest.raises(RuntimeError):
        checkpoint.save(root, 20, rank=0, write=crash_half_way)
    newest = checkpoint.newest(root)
    assert newest.name == "step00000010"
    restored = ConvNet()
    restored.load_state_dict(torch.load(newest / "model.pt"))
    assert param_digest(restored.named_parameters()) == param_digest(good.named_parameters())

    save_model(root, 20, good)  # the next attempt clears the debris and publishes
    assert checkpoint.newest(root).name == "step00000020"
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())


class WithRank1:
    """checkpoint.save's Agreement as rank ``rank`` of two, the other rank voting ``theirs`` at the write (its second
    vote) and None at the others; ``mine``: this rank's votes."""

    world = 2

    def __init__(self, theirs, rank: int = 0) -> None:
        self.theirs, self.rank, self.mine = theirs, rank, []

    def votes(self, mine) -> list:
        self.mine.append(mine)
        other = self.theirs if len(self.mine) == 2 else None
        return [mine, other] if self.rank == 0 else [other, mine]


def test_a_checkpoint_another_rank_could_not_write_for_want_of_space_is_published_by_none_and_ends_in_its_line(
        tmp_path):
    root = tmp_path / "checkpoints"
    save_model(root, 10, ConvNet())
    line = "file too large writing checkpoint step00000020 on rank 1 in ...: free space or move --run-dir"
    agree = WithRank1((1, errno.EFBIG, line, str(root)))
    with pytest.raises(checkpoint.StorageError) as raised:
        checkpoint.save(root, 20, rank=0, agree=agree,
                        write=lambda save_dir, tag: (save_dir / tag / "model.pt").write_bytes(b"whole"))
    assert (raised.value.errno, raised.value.strerror) == (errno.EFBIG, line)
    assert sorted(os.listdir(root)) == ["step00000010"]  # step 20 not published, its staging removed by rank 0
    assert agree.mine[:2] == [None, None]  # this rank's own share was written


def test_the_ranks_of_a_failed_checkpoint_raise_only_once_rank_0_removed_its_staging_folder(tmp_path):
    """On a full disk the space it frees is what every rank's error report is written into."""
    staged = []

    class Watching(WithRank1):
        def votes(self, mine) -> list:
            staged.append((tmp_path / ".tmp-step00000020").exists())
            return super().votes(mine)

    with pytest.raises(checkpoint.StorageError):
        checkpoint.save(tmp_path, 20, rank=0, agree=Watching((1, errno.ENOSPC, "no space left ...", str(tmp_path))),
                        write=lambda save_dir, tag: None)
    assert staged == [True, True, False]  # prepared, written, then met once more after the removal


def test_a_rank_that_could_not_write_its_share_for_want_of_space_votes_its_line_naming_itself(tmp_path):
    def too_large(save_dir, tag):
        raise OSError(errno.EFBIG, "File too large")

    agree = WithRank1(None, rank=1)
    with pytest.raises(checkpoint.StorageError) as raised:
        checkpoint.save(tmp_path, 20, rank=1, agree=agree, write=too_large)
    assert raised.value.strerror.startswith(f"file too large writing checkpoint step00000020 on rank 1 in {tmp_path}:")
    assert agree.mine[1] == (1, errno.EFBIG, raised.value.strerror, str(tmp_path))


def test_a_bug_in_one_ranks_write_ends_it_with_its_own_error_and_the_others_with_one_naming_it(tmp_path):
    def bug(save_dir, tag):
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        checkpoint.save(tmp_path / "a", 20, rank=1, agree=WithRank1(None, rank=1), write=bug)
    with pytest.raises(OSError, match=r"rank 1 could not write its share of checkpoint step00000020 \(ValueError: a"):
        checkpoint.save(tmp_path / "b", 20, rank=0, agree=WithRank1((1, None, "ValueError: a bug", "b")),
                        write=lambda save_dir, tag: None)
    assert os.listdir(tmp_path / "b") == []


def test_one_process_agrees_with_itself_without_a_collective():
    assert checkpoint.Agreement(None).votes("mine") == ["mine"]
    assert checkpoint.Agreement.of_every_rank() == checkpoint.Agreement(None)  # no process group here


def test_a_ctrl_c_while_writing_a_checkpoint_leaves_no_half_written_one_behind(tmp_path):
    root = tmp_path / "checkpoints"
    save_model(root, 10, ConvNet())

    def interrupted_half_way(save_dir, tag):
        (save_dir / tag / "model.pt").write_bytes(b"half a file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(root, 20, rank=0, write=interrupted_half_way)
    assert sorted(os.listdir(root)) == ["step00000010"]


def test_a_ctrl_c_on_one_rank_while_its_share_is_written_stops_every_rank_as_interrupted_publishing_nothing(
        tmp_path):
    """A Ctrl-C on rank 1 alone (SIGINT to one rank) left save without a vote: rank 0, waiting at it, ended in gloo's
    "Connection closed by peer" (exit 1, a rank error for a user's stop) and left .tmp-step00000020 behind."""
    def interrupted(save_dir, tag):
        raise KeyboardInterrupt

    agree = WithRank1(None, rank=1)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "a", 20, rank=1, agree=agree, write=interrupted)
    # It voted at the write, where rank 0 waits, and met it once more after rank 0 removed the staging folder.
    assert len(agree.mine) == 3 and agree.mine[1] is not None and agree.mine[2] is None
    root = tmp_path / "b"
    save_model(root, 10, ConvNet())
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(root, 20, rank=0, agree=WithRank1(agree.mine[1]),
                        write=lambda save_dir, tag: (save_dir / tag / "model.pt").write_bytes(b"whole"))
    assert sorted(os.listdir(root)) == ["step00000010"]


def test_a_step_saved_again_after_a_crash_left_the_replaced_copy_behind_is_published(tmp_path):
    save_model(tmp_path, 10, ConvNet())
    # A kill between publishing step 10 again and removing the copy it replaced left that copy.
    (tmp_path / ".old-step00000010").mkdir()
    (tmp_path / ".old-step00000010" / "model.pt").write_bytes(b"replaced")
    save_model(tmp_path, 10, ConvNet())
    assert checkpoint.newest(tmp_path).name == "step00000010"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000010"]


def test_a_resume_after_a_kill_between_the_two_renames_of_a_step_saved_again_loads_that_step(tmp_path):
    save_model(tmp_path, 10, ConvNet())
    save_model(tmp_path, 20, ConvNet())
    # Killed after moving step 20 aside for its new copy, before renaming the new copy in.
    os.rename(tmp_path / "step00000020", tmp_path / ".old-step00000020")
    (tmp_path / ".tmp-step00000020" / "step00000020").mkdir(parents=True)
    assert checkpoint.choose(tmp_path, rank=0).name == "step00000020"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-step00000020", "step00000010", "step00000020"]
    (tmp_path / "step00000020" / "model.pt").write_bytes(b"torn")  # moved aside damaged: set aside as any other
    os.rename(tmp_path / "step00000020", tmp_path / ".old-step00000020")
    assert checkpoint.choose(tmp_path, rank=0, say=lambda line: None).name == "step00000010"


def test_a_resume_sets_a_step_aside_that_does_not_verify_and_takes_back_the_complete_copy_beside_it(tmp_path):
    save_model(tmp_path, 10, ConvNet())
    save_model(tmp_path, 20, ConvNet())
    # Step 20 saved again, killed before the copy it moved aside was removed; the new one torn since.
    shutil.copytree(tmp_path / "step00000020", tmp_path / ".old-step00000020")
    (tmp_path / "step00000020" / "model.pt").write_bytes(b"torn")
    said = []
    assert checkpoint.choose(tmp_path, rank=0, say=said.append).name == "step00000020"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".damaged-step00000020", "step00000010", "step00000020"]
    assert (tmp_path / ".damaged-step00000020" / "model.pt").read_bytes() == b"torn", "set aside, not removed"
    assert said == [f"resume: checkpoint {tmp_path / 'step00000020'} is damaged (model.pt has 4 bytes, the manifest "
                    f"says {(tmp_path / 'step00000020' / 'model.pt').stat().st_size}); set aside as "
                    ".damaged-step00000020, taking back its copy .old-step00000020"]


def test_a_run_resumed_where_a_torn_step_sits_beside_its_complete_copy_goes_on_from_that_step_as_if_never_stopped(
        tmp_path, capsys, one_process):
    args = ["--backend", "ddp", "--synthetic-size", "64", "--batch-size", "8", "--threads", "1", "--heartbeat-s", "0",
            "--checkpoint-every", "5", "--log-every", "1", "--precision", "fp32"]
    assert main([*args, "--run-dir", str(tmp_path / "reference"), "--max-steps", "15"]) == 0
    run = tmp_path / "run"
    assert main([*args, "--run-dir", str(run), "--max-steps", "10"]) == 0
    shutil.copytree(run / "checkpoints" / "step00000010", run / "checkpoints" / ".old-step00000010")
    with open(run / "checkpoints" / "step00000010" / checkpoint.TRAINER_FILE, "r+b") as torn:
        torn.truncate(1000)
    capsys.readouterr()
    assert main([*args, "--run-dir", str(run), "--max-steps", "15", "--resume"]) == 0
    assert f"resumed from {run / 'checkpoints' / 'step00000010'} at step 10" in capsys.readouterr().out
    assert (run / "checkpoints" / ".damaged-step00000010").is_dir()

    def losses(run_dir):
        return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses(run) == losses(tmp_path / "reference")


def two_checkpoints(root):
    torch.manual_seed(0)
    save_model(root, 10, ConvNet())
    save_model(root, 20, ConvNet())
    return root / "step00000020" / "model.pt"


def flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("harm, reason", [
    (lambda f: f.write_bytes(f.read_bytes()[:100]), "has 100 bytes, the manifest says"),
    (lambda f: f.unlink(), "model.pt is missing"),
    (flip_one_byte, "does not match its SHA-256"),
    (lambda f: (f.parent / checkpoints.MANIFEST).unlink(), "no MANIFEST.json"),
])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_complete_one(tmp_path, harm, reason):
    newest_file = two_checkpoints(tmp_path)
    assert checkpoints.damage(newest_file.parent) is None
    harm(newest_file)
    skipped = []
    assert checkpoint.newest(tmp_path, skipped=skipped).name == "step00000010"
    assert [p.name for p, _ in skipped] == ["step00000020"] and reason in skipped[0][1]


def test_the_manifest_is_written_last_and_lists_every_file_with_size_and_checksum(tmp_path):
    newest_file = two_checkpoints(tmp_path)
    listed = json.loads((newest_file.parent / checkpoints.MANIFEST).read_text())
    assert listed["step"] == 20 and list(listed["files"]) == ["model.pt"]
    assert listed["files"]["model.pt"]["size"] == newest_file.stat().st_size


def test_resume_sets_a_damaged_checkpoint_aside_and_takes_the_one_before(tmp_path):
    two_checkpoints(tmp_path)
    (tmp_path / "step00000020" / "model.pt").write_bytes(b"")
    said = []
    chosen = checkpoint.choose(tmp_path, rank=0, say=said.append)
    assert chosen.name == "step00000010" and checkpoint.newest(tmp_path).name == "step00000010"
    assert (tmp_path / ".damaged-step00000020").is_dir() and not (tmp_path / "step00000020").exists()
    assert "step00000020 is damaged (model.pt has 0 bytes" in said[0]
    # Other ranks take rank 0's choice, never their own view.
    assert checkpoint.choose(tmp_path, rank=1, share=lambda _: "step00000010").name == "step00000010"


def test_a_step_damaged_again_after_it_was_set_aside_once_is_set_aside_beside_the_first(tmp_path):
    two_checkpoints(tmp_path)
    (tmp_path / "step00000020" / "model.pt").write_bytes(b"")
    checkpoint.choose(tmp_path, rank=0, say=lambda line: None)
    save_model(tmp_path, 20, ConvNet())  # the run went on from step 10 and saved step 20 again
    (tmp_path / "step00000020" / "model.pt").write_bytes(b"")
    said = []
    assert checkpoint.choose(tmp_path, rank=0, say=said.append).name == "step00000010"
    assert (tmp_path / ".damaged-step00000020").is_dir() and (tmp_path / ".damaged-step00000020.2").is_dir()
    assert "set aside as .damaged-step00000020.2" in said[0]


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in (1, 2, 3, 4):
        save_model(tmp_path, step, ConvNet())
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["step00000003", "step00000004"]


def test_a_save_waits_while_another_thread_of_the_process_publishes_in_the_same_folder(tmp_path):
    # The snapshot writer persists into the checkpoints the loop saves to: staging names and pruning are shared.
    import threading

    saved = threading.Event()
    with checkpoint.publishing(tmp_path):
        worker = threading.Thread(target=lambda: (save_model(tmp_path, 1, ConvNet()), saved.set()))
        worker.start()
        assert not saved.wait(0.5)
        with checkpoint.publishing(tmp_path / "other"):
            pass  # another folder is not held up
    assert saved.wait(30)
    worker.join()
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["step00000001"]


def test_rng_states_round_trip():
    state = checkpoint.rng_state()
    expected = (torch.rand(3), np.random.rand(), random.random())
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0]) and np.random.rand() == expected[1]
    assert random.random() == expected[2]


def test_rng_states_round_trip_through_a_file_the_weights_only_loader_reads(tmp_path):
    torch.save(checkpoint.rng_state(), tmp_path / "rng-rank0.pt")
    expected = (torch.rand(3), np.random.rand(), random.random())
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "rng-rank0.pt"))
    assert torch.equal(torch.rand(3), expected[0]) and np.random.rand() == expected[1]
    assert random.random() == expected[2]


def test_rng_files_written_before_the_weights_only_loader_still_load(tmp_path):
    # Their numpy state is numpy's own uint32 array, which a resume after an upgrade must still read.
    earlier = {**checkpoint.rng_state(), "numpy": np.random.get_state()}
    torch.save(earlier, tmp_path / "rng-rank0.pt")
    expected = np.random.rand()
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "rng-rank0.pt"))
    assert np.random.rand() == expected


class RunsCode:
    """Unpickled, it calls open(): what a planted checkpoint could make a resume run instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture
def one_process(monkeypatch):
    """A trainer run in this process as one rank outside Slurm; what it exports (RANK, MASTER_PORT) and the process
    group an error left it in (a real trainer's process ends there) are undone after."""
    import torch.distributed as dist

    saved = dict(os.environ)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def test_resume_from_a_checkpoint_whose_pickle_calls_code_runs_none_and_exits_2_in_one_line(tmp_path, capsys,
                                                                                           one_process):
    run, marker = tmp_path / "run", tmp_path / "ran"
    # Complete by its manifest: only what the file holds is wrong.
    checkpoint.save(run / "checkpoints", 1, rank=0, write=lambda save_dir, tag: torch.save(
        {"step": 1, "model": {}, "evil": RunsCode(marker)}, save_dir / tag / checkpoint.TRAINER_FILE))
    code = main(["--backend", "ddp", "--run-dir", str(run), "--synthetic-size", "64", "--batch-size", "8",
                 "--max-steps", "2", "--threads", "1", "--heartbeat-s", "0", "--resume"])
    err = capsys.readouterr().err.strip()
    assert not marker.exists()
    assert code == 2 and len(err.splitlines()) == 1
    assert "step00000001/trainer.pt" in err and "not loaded" in err and "--run-dir" in err



def test_dp_and_ddp_resume_in_another_precision_fp16_starting_its_loss_scale_afresh(tmp_path, capsys, one_process):
    # Autocast leaves the weights and Adam's moments fp32 in every precision; only fp16 keeps a loss scale.
    args = ["--backend", "ddp", "--run-dir", str(tmp_path / "run"), "--synthetic-size", "64", "--batch-size", "8",
            "--threads", "1", "--heartbeat-s", "0"]
    assert main([*args, "--precision", "bf16", "--max-steps", "2"]) == 0
    for precision, steps in (("fp16", 4), ("fp32", 6)):
        capsys.readouterr()
        assert main([*args, "--precision", precision, "--max-steps", str(steps), "--resume"]) == 0
        assert f"at step {steps - 2}" in capsys.readouterr().out


def test_a_resume_with_another_lr_than_its_checkpoint_was_trained_with_is_refused_in_one_line(tmp_path, capsys,
                                                                                            one_process):
    # The optimizer's state holds the lr it was trained with: loaded, it would silently overrule --lr.
    args = ["--backend", "ddp", "--run-dir", str(tmp_path / "run"), "--synthetic-size", "64", "--batch-size", "8",
            "--threads", "1", "--heartbeat-s", "0"]
    assert main([*args, "--lr", "0.01", "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert main([*args, "--lr", "0.5", "--max-steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step00000002" in err and "lr 0.01" in err and "--lr 0.01" in err


def test_a_resume_from_a_checkpoint_of_another_model_shape_exits_2_in_one_line_naming_the_mismatch(tmp_path, capsys,
                                                                                                one_process):
    # Retried, a job would crash on it the same way every time: bad input, not a failure of the run.
    args = ["--backend", "ddp", "--run-dir", str(tmp_path / "run"), "--synthetic-size", "64", "--batch-size", "8",
            "--threads", "1", "--heartbeat-s", "0"]
    assert main([*args, "--max-steps", "2"]) == 0
    folder = tmp_path / "run" / "checkpoints" / "step00000002"
    state = checkpoint.load(folder / checkpoint.TRAINER_FILE)
    state["model"].update({"fc2.weight": torch.zeros(20, 128), "fc2.bias": torch.zeros(20)})  # 20 classes, not 10
    torch.save(state, folder / checkpoint.TRAINER_FILE)
    checkpoints.write_manifest(folder, 2)
    capsys.readouterr()
    assert main([*args, "--max-steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step00000002" in err and "fc2.weight" in err and "--run-dir" in err


def test_a_disk_that_fills_while_an_elastic_resume_converts_a_checkpoint_is_a_storage_error_leaving_no_copy(
        tmp_path, monkeypatch):
    from deepspeed.checkpoint import ds_to_universal

    from train.engines import DeepSpeedEngine

    def fill_the_disk(args):
        Path(args.output_folder).mkdir(parents=True)
        (Path(args.output_folder) / "zero").write_bytes(b"half a copy")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ds_to_universal, "main", fill_the_disk)
    root = tmp_path / "checkpoints"
    saved = checkpoint.save(root, 4, rank=0, write=lambda save_dir, tag: (save_dir / tag / "x.pt").write_bytes(b"x"))
    with pytest.raises(checkpoint.StorageError) as raised:
        object.__new__(DeepSpeedEngine)._read_universal(saved, rank=0, world=1)
    assert "no space left on device" in raised.value.strerror and "step00000004" in raised.value.strerror
    assert sorted(p.name for p in root.iterdir()) == ["step00000004"]


def test_an_elastic_resume_s_conversion_whose_torch_save_finds_no_space_is_a_storage_error_leaving_no_copy(
        tmp_path, monkeypatch):
    # DeepSpeed's conversion saves with torch.save to a path, whose own writer would keep no errno of the write.
    from deepspeed.checkpoint import ds_to_universal

    from train.engines import DeepSpeedEngine

    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def convert(args):
        Path(args.output_folder).mkdir(parents=True)
        torch.save({"param": torch.zeros(4)}, Path(args.output_folder) / "fp32.pt")
    monkeypatch.setattr(ds_to_universal, "main", convert)
    root = tmp_path / "checkpoints"
    saved = checkpoint.save(root, 4, rank=0, write=lambda save_dir, tag: (save_dir / tag / "x.pt").write_bytes(b"x"))
    monkeypatch.setattr(checkpoint, "open", FullDisk, raising=False)  # every write checkpoint.put makes
    with pytest.raises(checkpoint.StorageError) as raised:
        object.__new__(DeepSpeedEngine)._read_universal(saved, rank=0, world=1)
    assert raised.value.strerror.startswith(f"no space left on device writing checkpoint step00000004's universal "
                                            f"copy in {root}"), raised.value.strerror
    assert sorted(p.name for p in root.iterdir()) == ["step00000004"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_file_system_out_of_inodes_is_a_full_disk_whose_storage_error_leaves_no_half_written_checkpoint(tmp_path):
    # torch's own writer reports the file it could not create as a RuntimeError, whatever the bytes free.
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,nr_inodes=4", "tmpfs", str(small)], check=True)
    try:
        with pytest.raises(checkpoint.StorageError) as raised:
            checkpoint.save(small, 1, rank=0, write=lambda save_dir, tag: [
                torch.save({"n": n}, save_dir / tag / f"{n}.pt") for n in range(3)])
        assert raised.value.strerror.startswith(f"no space left on device writing checkpoint step00000001 in {small}")
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)


@pytest.mark.parametrize("code, advice", [
    (errno.ENOSPC, "free space or move --run-dir"),
    (errno.EDQUOT, "free some of your quota (or have it raised) or move --run-dir"),
    (errno.EFBIG, "raise the file-size limit (ulimit -f)"),
    (errno.EROFS, "make it writable or move --run-dir")])
def test_a_storage_error_advises_what_clears_its_own_errno(tmp_path, code, advice):
    line = checkpoint.storage_error(code, tmp_path, "step00000004").strerror
    assert line.endswith(f": {advice}, then resubmit with --resume"), line


def test_a_storage_error_before_any_checkpoint_says_in_words_that_none_exists_and_what_is_not_known(tmp_path):
    line = checkpoint.storage_error(errno.EFBIG, tmp_path, "step00000005").strerror
    assert line.startswith(f"file too large writing checkpoint step00000005 in {tmp_path}: ")
    assert line.endswith(" bytes free; no earlier checkpoint is intact, so the size needed is unknown: raise the "
                         "file-size limit (ulimit -f), then resubmit with --resume"), line
    gone = checkpoint.storage_error(errno.ENOSPC, tmp_path / "gone", "step00000005").strerror
    assert f"in {tmp_path / 'gone'}: free space unknown; no earlier checkpoint is intact" in gone, gone
    assert "?" not in line + gone and "(none)" not in line + gone and "\n" not in line + gone


def test_a_storage_error_where_only_damaged_checkpoints_are_says_none_is_intact_not_that_none_exists(tmp_path):
    save_model(tmp_path, 5, ConvNet())
    (tmp_path / "step00000005" / "model.pt").write_bytes(b"torn")
    line = checkpoint.storage_error(errno.ENOSPC, tmp_path, "step00000010").strerror
    assert "bytes free; no earlier checkpoint is intact, so the size needed is unknown: free space" in line, line


def test_a_failed_write_s_reason_is_the_words_of_the_errno_torch_wrapped_not_torch_s_own_text():
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    wrapped.__context__ = OSError(errno.ESTALE, os.strerror(errno.ESTALE))  # the file's write, under torch's writer
    assert checkpoint.reason(wrapped) == "Stale file handle"
    assert checkpoint.reason(RuntimeError("a bug")) == "a bug"  # no errno anywhere: the error's own words
    assert checkpoint.reason(checkpoint.StorageError(errno.EFBIG, "file too large writing ...")) == "File too large"


def test_a_link_at_the_run_s_metrics_file_is_refused_in_one_line_never_written_through(tmp_path, capsys, one_process):
    secret = tmp_path / "secret"
    secret.write_text("keep\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").symlink_to(secret)
    code = main(["--backend", "ddp", "--run-dir", str(tmp_path / "run"), "--synthetic-size", "64", "--batch-size", "8",
                 "--max-steps", "2", "--threads", "1", "--heartbeat-s", "0"])
    err = capsys.readouterr().err.strip()
    assert secret.read_text() == "keep\n"
    assert code == 2 and len(err.splitlines()) == 1 and "metrics.jsonl is a symbolic link" in err


def test_a_fresh_run_beside_an_earlier_run_s_checkpoints_is_refused_in_one_line_and_touches_nothing(tmp_path, capsys,
                                                                                                  one_process):
    # Started, it would prune its own checkpoints against the earlier, later steps, and a --resume would take those.
    run = tmp_path / "run"
    save_model(run / "checkpoints", 6, ConvNet())
    (run / "metrics.jsonl").write_text('{"step": 6}\n')
    code = main(["--backend", "ddp", "--run-dir", str(run), "--synthetic-size", "64", "--batch-size", "8",
                 "--max-steps", "2", "--threads", "1", "--heartbeat-s", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "step00000006" in err and "--resume" in err and "--run-dir" in err
    assert [p.name for p in checkpoint.complete(run / "checkpoints")] == ["step00000006"]
    assert (run / "metrics.jsonl").read_text() == '{"step": 6}\n'
    # DeepSpeed's parts persisted by an earlier run's nodes count too: a fresh start would clear them.
    save_model(run / "checkpoints" / ".parts" / "part-0-of-2", 8, ConvNet())
    assert checkpoint.earlier_run(run / "checkpoints") == ["step00000006", ".parts/part-0-of-2/step00000008"]


# --- backends and configs ------------------------------------------------------------------------------

def test_dp_refuses_more_than_one_process_with_exit_2(tmp_path, monkeypatch, capsys):
    for name, value in SRUN_RANK_1_OF_2.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HPCDIST_HEARTBEAT_STAGE", str(tmp_path / "stage"))  # not /dev/shm: no epilog runs here
    rc = main(["--backend", "dp", "--run-dir", str(tmp_path), "--threads", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "rank 1 of 2" in err and "--backend ddp" in err


@pytest.mark.parametrize("file_at,run_dir", [("run", "run"), ("run/checkpoints", "run"), ("run", "run/sub")])
def test_a_run_dir_or_checkpoints_that_is_no_folder_is_refused_before_any_training(
        file_at, run_dir, tmp_path, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HPCDIST_HEARTBEAT_STAGE", str(tmp_path / "stage"))
    (tmp_path / file_at).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file_at).write_text("the user's\n")
    rc = main(["--backend", "ddp", "--run-dir", str(tmp_path / run_dir), "--synthetic-size", "64",
               "--batch-size", "32", "--max-steps", "2", "--threads", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--run-dir" in err, err
    assert (tmp_path / file_at).read_text() == "the user's\n"
    assert not (tmp_path / run_dir / "metrics.jsonl").exists()


def resume_refusal(backend: str, run_dir: Path, capsys) -> str:
    rc = main(["--backend", backend, "--run-dir", str(run_dir), "--synthetic-size", "64", "--batch-size", "32",
               "--max-steps", "2", "--threads", "1", "--resume"])
    err = capsys.readouterr().err.strip()
    if torch.distributed.is_initialized():  # refused after joining; a process of its own would exit here
        torch.distributed.destroy_process_group()
    assert rc == 2 and len(err.splitlines()) == 1 and "--run-dir" in err, err
    return err


@pytest.mark.parametrize("backend", ["dp", "ddp"])
def test_a_deepspeed_checkpoint_is_refused_by_dp_and_ddp_in_one_line(backend, tmp_path, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HPCDIST_HEARTBEAT_STAGE", str(tmp_path / "stage"))
    folder = tmp_path / "run" / "checkpoints" / "step00000001"
    folder.mkdir(parents=True)
    torch.save({}, folder / "mp_rank_00_model_states.pt")  # DeepSpeed's files, no trainer.pt
    checkpoints.write_manifest(folder, 1)
    assert "step00000001 was written by deepspeed" in resume_refusal(backend, tmp_path / "run", capsys)
    assert checkpoints.newest(tmp_path / "run" / "checkpoints") == folder


def test_a_ddp_checkpoint_is_refused_by_deepspeed_in_one_line(tmp_path, monkeypatch, capsys):
    import train.__main__ as trainer
    from train.engines import DeepSpeedEngine

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HPCDIST_HEARTBEAT_STAGE", str(tmp_path / "stage"))
    assert main(["--backend", "ddp", "--run-dir", str(tmp_path / "run"), "--synthetic-size", "64",
                 "--batch-size", "32", "--max-steps", "1", "--threads", "1"]) == 0
    capsys.readouterr()
    # DeepSpeed itself is not started: it initialises once a process, and the refusal comes before it loads.
    monkeypatch.setattr(DeepSpeedEngine, "__init__", lambda self, model, config: setattr(
        self, "input_dtype", torch.float32))
    monkeypatch.setattr(DeepSpeedEngine, "read", lambda *a: pytest.fail("DeepSpeed was asked to load it"))
    monkeypatch.setattr(trainer, "init_process_group", lambda *a: "gloo")
    assert "step00000001 was written by dp/ddp" in resume_refusal("deepspeed", tmp_path / "run", capsys)


@pytest.mark.parametrize("has_fp16", [False, True])
def test_deepspeed_fp16_on_a_cpu_without_fp16_kernels_is_refused_before_deepspeed_starts(
        has_fp16, tmp_path, monkeypatch, capsys):
    import train.__main__ as trainer
    from train.engines import DeepSpeedEngine

    monkeypatch.setattr(trainer, "cpu_has_fp16", lambda: has_fp16)
    started = []
    monkeypatch.setattr(DeepSpeedEngine, "__init__", lambda self, model, config: started.append(config) or
                        (_ for _ in ()).throw(RuntimeError("stop here")))
    monkeypatch.setattr(trainer, "init_process_group", lambda *a: "gloo")
    args = ["--backend", "deepspeed", "--precision", "fp16", "--run-dir", str(tmp_path), "--threads", "1"]
    if has_fp16:
        with pytest.raises(RuntimeError, match="stop here"):
            main(args)
        assert started and started[0]["fp16"]["enabled"]
    else:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--precision bf16" in err and not started


def test_bad_command_lines_exit_2_with_one_line():
    with pytest.raises(SystemExit) as exit_:
        main(["--backend", "ddp", "--run-dir", "x", "--dataset", "cifar10"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("given, sanitized", [
    ("9.0a;8.0", "9.0;8.0"),
    ("9.0a 10.0f 12.0", "9.0;10.0;12.0"),
    ("8.6+PTX;9.0a", "8.6+PTX;9.0"),
    ("9.0;9.0a", "9.0"),
    ("7.0", "7.0"),
])
def test_arch_list_sanitizer_drops_the_suffixes_deepspeed_cannot_parse(given, sanitized):
    assert runtime.sanitize_arch_list(given) == sanitized


def test_deepspeed_environment_is_made_safe_before_its_import():
    hopper = {"TORCH_CUDA_ARCH_LIST": "9.0a;8.0"}
    runtime.prepare_deepspeed_environment(hopper, cuda=True)
    assert hopper == {"TORCH_CUDA_ARCH_LIST": "9.0;8.0"}
    cpu_only: dict[str, str] = {}
    runtime.prepare_deepspeed_environment(cpu_only, cuda=False)
    assert cpu_only == {"DS_ACCELERATOR": "cpu"}
    chosen = {"DS_ACCELERATOR": "xpu"}
    runtime.prepare_deepspeed_environment(chosen, cuda=False)
    assert chosen == {"DS_ACCELERATOR": "xpu"}


@pytest.mark.parametrize("site", [{}, {"NCCL_DEBUG": "WARN", "NCCL_DEBUG_SUBSYS": "COLL",
                                     "NCCL_DEBUG_FILE": "/scratch/nccl.log"}])
def test_the_preflight_has_nccl_name_its_transports_where_doctor_reads_whatever_the_profile_exports(tmp_path, site):
    # example-ib exports NCCL_DEBUG=WARN for its training runs: at that level NCCL names no channel's transport.
    environ = dict(site)
    runtime.log_nccl_for_preflight(environ, tmp_path)
    assert environ["NCCL_DEBUG"] == "INFO" and "NCCL_DEBUG_SUBSYS" not in environ
    assert environ["NCCL_DEBUG_FILE"] == str(tmp_path / "preflight" / "nccl-%h-%p.log")
    traced = {"NCCL_DEBUG": "TRACE"}
    runtime.log_nccl_for_preflight(traced, tmp_path)
    assert traced["NCCL_DEBUG"] == "TRACE"  # more than INFO, the channel lines included


def test_a_cpu_deepspeed_job_joins_its_process_group_without_compiling_the_shm_comm_op(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op

    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", True)
    runtime.without_shm_comm()
    assert build_shm_op() is None  # None: nothing compiled, nothing loaded


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_a_lone_process_joins_its_group_while_another_holds_the_default_master_port(backend, one_process,
                                                                                     monkeypatch):
    # Two runs by hand (or a sweep's one-task jobs) on one machine: the first holds torch's port 29500.
    import socket

    import torch.distributed as dist

    from hpc import ranks
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the TIME_WAIT of earlier runs' connections
    try:
        holder.bind(("", ranks.DEFAULT_MASTER_PORT))
        holder.listen()
    except OSError:
        pass  # another process listens there already: as good
    try:
        runtime.init_process_group(backend, ranks.resolve({}), torch.device("cpu"), timeout_s=30)
        assert dist.get_world_size() == 1
    finally:
        holder.close()



@pytest.mark.parametrize(("origin", "advice"), [("HPCDIST_MASTER_PORT", "resubmit: a new job picks another"),
                                                ("MASTER_PORT", "set MASTER_PORT to a port free")])
def test_rank_0_finding_its_master_port_taken_says_so_in_one_line_naming_the_port_and_what_to_do(
        tmp_path, capsys, one_process, monkeypatch, origin, advice):
    # Between the local runner's choice of a free port and rank 0's listen, any program may bind it.
    import socket

    from hpc import ranks, task
    squatter = socket.socket()
    squatter.bind(("", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    for name in ranks.LAUNCHER_VARIABLES:  # an earlier test's trainer exported its own
        monkeypatch.delenv(name, raising=False)
    for name, value in {**task.local_env(task.Geometry(2, 1), 0, "4242"), origin: str(port)}.items():
        monkeypatch.setenv(name, value)
    try:
        status = main(["--backend", "ddp", "--run-dir", str(tmp_path / "run"), "--synthetic-size", "64",
                       "--threads", "1", "--heartbeat-s", "0", "--max-steps", "1", "--timeout-s", "20"])
    finally:
        squatter.close()
    err = capsys.readouterr().err
    assert status == 1
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"MASTER_PORT {port}" in err and "in use" in err and advice in err


def test_a_lone_process_says_it_holds_no_master_port_and_records_none(tmp_path, capsys, one_process):
    run = tmp_path / "run"
    assert main(["--backend", "ddp", "--run-dir", str(run), "--synthetic-size", "64", "--batch-size", "8",
                 "--threads", "1", "--heartbeat-s", "0", "--max-steps", "1"]) == 0
    assert "one process: no master port" in capsys.readouterr().out
    assert json.loads((run / "summary.json").read_text())["ranks"][0]["master_port"] is None


# --- heartbeat -----------------------------------------------------------------------------------------

CONTRACT_FIELDS = {"rank", "local_rank", "node_rank", "world_size", "hostname", "pid", "attempt", "phase", "step",
                   "start_step", "total_steps", "time", "step_time_s", "compute_s", "comm_s", "images_per_s", "loss",
                   "rss_bytes", "peak_memory_bytes", "marks", "recent_compute_s", "step_at",
                   "snapshot_step"}


def one_rank_env():
    from hpc import ranks
    return ranks.resolve(SRUN_RANK_1_OF_2)


def srun_env(rank: int, per_node: int = 2, nodes: int = 2, stage: Path | None = None) -> dict:
    """Slurm's environment for ``rank`` of ``nodes`` x ``per_node`` (block distribution), staging under ``stage``."""
    env = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(per_node * nodes), "SLURM_LOCALID": str(rank % per_node),
           "SLURM_NODEID": str(rank // per_node), "SLURM_STEP_ID": "0", "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})",
           "SLURM_JOB_NODELIST": f"n[1-{nodes}]", "SLURM_JOB_ID": "777"}
    return {**env, "HPCDIST_HEARTBEAT_STAGE": str(stage)} if stage else env


def beating(run_dir: Path, ranks_: range, every_s: float, stage: Path, clock=time.time, **env_kw) -> list:
    """One identified heartbeat per rank (in this process: what each rank's process would hold)."""
    from hpc import ranks
    from train import heartbeat
    out = []
    for rank in ranks_:
        env = srun_env(rank, stage=stage, **env_kw)
        beat = heartbeat.Heartbeat(run_dir, every_s=every_s, clock=clock, marks={"process_start": 1.0})
        beat.identify(ranks.resolve(env), env, hostname=f"n{rank // env_kw.get('per_node', 2) + 1}")
        out.append(beat)
    return out


def wait_for(check, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.01)


def test_one_file_per_node_written_by_its_local_rank_0_with_every_rank_s_beat(tmp_path):
    from hpc import beatfile, monitor
    from train import heartbeat
    run = tmp_path / "run"
    beats = beating(run, range(4), 0.05, tmp_path / "shm")
    try:
        assert [b.publisher is not None for b in beats] == [True, False, True, False]
        wait_for(lambda: set(heartbeat.read_all(run)) == {0, 1, 2, 3})
        # On the shared run directory: per node one latest file and its history, never a file per rank.
        assert sorted(p.name for p in beatfile.folder(run).iterdir()) == [
            "node-0.json", "node-0.jsonl", "node-1.json", "node-1.jsonl"]
        document = beatfile.read_node(beatfile.node_path(run, 1))
        assert [b["rank"] for b in document["ranks"]] == [2, 3] and document["node"] == 1
        assert all(tuple(b) == beatfile.FIELDS for b in document["ranks"])  # one schema, in its order
        assert CONTRACT_FIELDS == set(beatfile.FIELDS)
        first = monitor.read_heartbeats(run)[3]
        assert (first.rank, first.local_rank, first.node_rank, first.world_size, first.hostname, first.phase) == \
            (3, 1, 1, 4, "n2", "setup")
        assert first.pid == os.getpid() and first.rss_bytes > 0 and first.marks == {"process_start": 1.0}
        # The hand-over is node-local: each node's ranks in their own folder, outside the run directory.
        assert beats[0].stage != beats[2].stage and beats[0].stage == beats[1].stage
        assert sorted(p.name for p in beats[2].stage.iterdir()) == ["rank-2.json", "rank-3.json"]
    finally:
        for b in reversed(beats):
            b.finish("done")
    assert {r: b.phase for r, b in monitor.read_heartbeats(run).items()} == dict.fromkeys(range(4), "done")


def test_a_stage_someone_else_made_first_is_refused_with_what_to_do(tmp_path):
    from train import nodebeat

    assert nodebeat.claim(tmp_path / "mine") == tmp_path / "mine"
    (tmp_path / "theirs").mkdir()
    (tmp_path / "stage").symlink_to(tmp_path / "theirs")
    with pytest.raises(nodebeat.StageError, match="is a link or another user's; remove it, or set "
                                                  "HPCDIST_HEARTBEAT_STAGE to a folder of yours"):
        nodebeat.claim(tmp_path / "stage")


def test_a_stage_is_named_by_its_slurm_job_so_the_epilog_frees_what_a_killed_run_left(tmp_path):
    env = {"HPCDIST_HEARTBEAT_STAGE": str(tmp_path)}
    in_job = nodebeat.stage_dir(tmp_path / "run", {**env, "SLURM_JOB_ID": "4711"}, node=1, attempt=0)
    assert in_job.parent == tmp_path and in_job.name.startswith("hpcdist-beats-4711-")
    assert nodebeat.stage_dir(tmp_path / "run", {**env, "SLURM_JOB_ID": "4711"}, node=0, attempt=0) != in_job
    assert nodebeat.stage_dir(tmp_path / "run", env, node=1, attempt=0).name.startswith("hpcdist-beats-local-")
    assert nodebeat.stage_dir(tmp_path / "run", {**env, "SLURM_JOB_ID": "../x"}, 1, 0).parent == tmp_path


def test_clearing_a_stage_removes_only_what_ranks_wrote_there(tmp_path):
    from pathlib import Path as P

    from train import nodebeat, watchdog
    # The relayed names are the watchdog's run directory files, as the node's reader hands them over.
    assert {P(n).name for n in (watchdog.LOST, watchdog.DECLARED)} == set(nodebeat.RELAYED)
    stage = tmp_path / "shm" / "hpcdist-beats-x"
    nodebeat.stage(stage, {"rank": 3, "phase": "train"})
    for name in nodebeat.RELAYED:
        (stage / name).write_text("{}")
    (stage / "theirs.txt").write_text("not hpcdist's")
    nodebeat.clear(stage)
    assert sorted(p.name for p in stage.iterdir()) == ["theirs.txt"]
    (stage / "theirs.txt").unlink()
    nodebeat.clear(stage)
    assert not stage.exists()
    # A link in its place is left alone, and so is what it points at.
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "rank-0.json").write_text("{}")
    stage.symlink_to(target)
    nodebeat.clear(stage)
    assert stage.is_symlink() and (target / "rank-0.json").exists()


def test_a_node_whose_local_rank_0_is_absent_writes_nothing_on_the_run_dir(tmp_path):
    from hpc import beatfile
    [lonely] = beating(tmp_path / "run", range(1, 2), 0.05, tmp_path / "shm")
    time.sleep(0.2)
    lonely.finish("done")
    assert not beatfile.folder(tmp_path / "run").exists() and (tmp_path / "shm").exists()


def test_phase_changes_reach_the_history_and_a_publish_comes_at_most_once_per_period(tmp_path):
    from hpc import beatfile, monitor
    now = [1000.0]
    run = tmp_path / "run"
    beats = beating(run, range(2), 60.0, tmp_path / "shm", clock=lambda: now[0], nodes=1)
    lead, other = beats
    for b in beats:
        b.plan(total_steps=10, local_batch=32)
    written = beatfile.read_node(beatfile.node_path(run, 0))
    other.phase("train")
    other.mark("first_step_done", 5.0)
    # Within the period another rank's hand-over does not rewrite the node file...
    assert beatfile.read_node(beatfile.node_path(run, 0)) == written
    # ...while the publisher's own phase change is published at once, with what the others handed over.
    lead.phase("train")
    assert {b.phase for b in monitor.read_heartbeats(run).values()} == {"train"}
    lead.mark("first_step_done", 5.0)
    lead.mark("first_step_done", 9.0)  # a mark is set once
    written = beatfile.read_node(beatfile.node_path(run, 0))
    now[0] += 10
    lead.write()
    assert beatfile.read_node(beatfile.node_path(run, 0)) == written
    now[0] += 50
    lead.write()
    assert monitor.read_heartbeats(run)[0].marks["first_step_done"] == 5.0
    other.finish("done")
    lead.finish("done")
    last = monitor.read_heartbeats(run)[0]
    assert last.phase == "done" and last.total_steps == 10 and last.marks["first_step_done"] == 5.0
    # A history line at each phase change the publisher saw, and one when HISTORY_EVERY_S passed without one.
    assert [b.phase for b in monitor.read_histories(run)[0]] == ["setup", "train", "train", "done"]
    # A rank's beat that two node lines repeat unchanged is one point of its history.
    assert [b.phase for b in monitor.read_histories(run)[1]] == ["train", "done"]
    with pytest.raises(ValueError, match="unknown heartbeat phase"):
        lead.phase("lunch")


def test_the_history_is_bounded_and_keeps_the_newest(tmp_path):
    from hpc import beatfile, monitor
    from train import nodebeat
    writer = nodebeat.Publisher(tmp_path, 0, history_every_s=0, history_bytes=8192)
    for step in range(500):
        writer.publish("n1", 0, 1000.0 + step, {0: {"rank": 0, "phase": "train", "step": step, "time": 1000.0 + step}})
    writer.close()
    sizes = [p.stat().st_size for p in beatfile.folder(tmp_path).glob("node-0.jsonl*")]
    assert len(sizes) == 2 and sum(sizes) <= 2 * 8192
    steps = [b.step for b in monitor.read_histories(tmp_path)[0]]
    assert steps[-1] == 499 and steps == sorted(steps) and len(steps) < 500


def test_a_torn_node_file_is_read_again_or_skipped_never_misread(tmp_path):
    from hpc import beatfile
    from train import nodebeat
    writer = nodebeat.Publisher(tmp_path, 0)
    writer.publish("n1", 0, 1.0, {r: {"rank": r, "hostname": "n1" * 50} for r in range(4)})
    writer.publish("n1", 0, 2.0, {0: {"rank": 0}})   # shorter: blanks cover the rest
    writer.close()
    path = beatfile.node_path(tmp_path, 0)
    assert [b["rank"] for b in beatfile.read_node(path)["ranks"]] == [0]
    text = path.read_bytes()
    path.write_bytes(text[:20] + b"X" + text[21:])  # a rewrite caught half done
    assert beatfile.read_node(path) is None


def test_heartbeat_thread_rewrites_the_file_while_the_phase_stands_still(tmp_path):
    from hpc import beatfile
    beats = beating(tmp_path / "run", range(1), 0.05, tmp_path / "shm", per_node=1, nodes=1)
    path = beatfile.node_path(tmp_path / "run", 0)
    try:
        first = beatfile.read_node(path)["time"]
        wait_for(lambda: beatfile.read_node(path)["time"] != first)
    finally:
        beats[0].finish("done")


def test_heartbeat_s_0_writes_nothing(tmp_path):
    from hpc import beatfile
    from train import heartbeat
    beat = heartbeat.Heartbeat(tmp_path, every_s=0)
    beat.identify(one_rank_env(), {})
    beat.phase("train")
    beat.stepped(1)
    beat.finish("done")
    assert not beatfile.folder(tmp_path).exists() and beat.stage is None


def test_step_clock_splits_each_step_into_compute_and_the_waits_in_collectives():
    from train.heartbeat import StepClock
    now = [0.0]
    clock = StepClock(clock=lambda: now[0])
    clock.begin()
    for _ in range(3):
        now[0] += 0.5                  # forward and backward
        clock.bucket_launched()        # DDP hands the last bucket to the all-reduce ...
        now[0] += 0.2
        clock.bucket_finished()        # ... and the backward waits 0.2 s for it
        with clock.waited():
            now[0] += 0.1              # the preemption vote
        clock.end_step()
    split = clock.summary()
    assert split["step_time_s"] == pytest.approx(0.8)
    assert split["comm_s"] == pytest.approx(0.3) and split["compute_s"] == pytest.approx(0.5)
    assert split["recent_compute_s"] == pytest.approx([0.5] * 3)


def test_a_beat_carries_the_newest_compute_times_the_straggler_test_judges_and_no_more():
    """Every reader at 4,096 x 8 parses each float of 32,768 beats: a ring of 16, of which the test reads 3, was 0.2 s
    of each read; compute_s is still the median over the whole window."""
    from hpc import beatfile, monitor
    from train.heartbeat import WINDOW, StepClock
    now = [0.0]
    clock = StepClock(clock=lambda: now[0])
    clock.begin()
    for seconds in range(1, WINDOW + 3):   # steps of 1, 2, ... WINDOW + 2 seconds: the ring keeps the last WINDOW
        now[0] += seconds
        clock.end_step()
    split = clock.summary()
    assert split["recent_compute_s"] == pytest.approx([float(s) for s in range(WINDOW + 3 - beatfile.RING, WINDOW + 3)])
    assert split["compute_s"] == pytest.approx(statistics.median(range(3, WINDOW + 3)))
    assert monitor.SUSTAIN == beatfile.RING


def test_images_per_s_is_this_ranks_local_batch_over_the_median_step_time(tmp_path):
    from train import heartbeat
    now = [0.0]
    beat = heartbeat.Heartbeat(tmp_path, every_s=0)
    beat.step_clock = heartbeat.StepClock(clock=lambda: now[0])
    beat.plan(total_steps=5, local_batch=32)
    beat.step_clock.begin()
    for step in range(1, 4):
        now[0] += 0.25
        beat.stepped(step)
    assert beat.snapshot()["images_per_s"] == 128.0 and beat.snapshot()["step"] == 3


class CountedLoss:
    """A loss whose value is read only through float(), counting the reads (each is a device sync on a GPU)."""

    def __init__(self, value: float) -> None:
        self.value, self.reads = value, 0

    def __float__(self) -> float:
        self.reads += 1
        return self.value


def test_the_heartbeat_s_loss_is_the_newest_step_s_read_when_written_not_when_stepped(tmp_path):
    from train import heartbeat
    beat = heartbeat.Heartbeat(tmp_path, every_s=0)
    losses = [CountedLoss(2.3 - step / 10) for step in range(1, 6)]
    for step, loss in enumerate(losses, start=1):
        beat.stepped(step, loss)
    assert [loss.reads for loss in losses] == [0] * 5
    assert beat.snapshot()["loss"] == pytest.approx(1.8) and losses[-1].reads == 1
    assert heartbeat.Heartbeat(tmp_path, every_s=0).snapshot()["loss"] is None


def test_a_run_without_log_every_records_at_least_the_curve_s_points_and_prints_every_100(tmp_path, capsys,
                                                                                          monkeypatch):
    import train.__main__ as trainer
    from train import stephooks

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    run = tmp_path / "run"
    code = trainer.main(["--backend", "ddp", "--run-dir", str(run), "--dataset", "synthetic", "--synthetic-size", "256",
                         "--batch-size", "8", "--epochs", "10", "--max-steps", "200", "--threads", "1",
                         "--heartbeat-s", "0"])
    assert code == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) >= stephooks.CURVE_POINTS and steps[-1] == 200
    assert steps == sorted(set(steps)) and max(b - a for a, b in zip(steps, steps[1:])) <= 200 // stephooks.CURVE_POINTS
    printed = [line for line in capsys.readouterr().out.splitlines() if "Loss:" in line]
    assert [line.split("Loss:")[0] for line in printed] == ["Epoch: 0 | Batch: 1/32 | ", "Epoch: 3 | Batch: 4/32 | ",
                                                            "Epoch: 6 | Batch: 8/32 | "]


# --- preemption vote -------------------------------------------------------------------------------------

def test_one_process_agrees_with_itself_at_once():
    from train.preemption import Agreement
    agreement = Agreement(1, torch.device("cpu"))
    assert agreement.exchange(True, False) == (True, False)
    assert agreement.now(False, True) == (False, True) and agreement.drain() == (False, False)


def test_wall_clock_checkpoint_is_voted_once_until_it_was_saved():
    from train.preemption import WallClock
    now = [0.0]
    wall = WallClock(600, clock=lambda: now[0])
    assert not wall.due()
    now[0] = 600
    assert wall.due() and not wall.due()  # the vote is read a step later: it must not be cast twice
    wall.saved()
    now[0] = 1199
    assert not wall.due()
    now[0] = 1200
    assert wall.due()
    assert not WallClock(0, clock=lambda: 1e9).due()


def test_a_stop_signal_before_torch_is_imported_is_remembered():
    code = ("import os, signal; from train import preemption; os.kill(os.getpid(), signal.SIGTERM); "
            "import torch; print(preemption.received())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and done.stdout.strip() == str(int(signal.SIGTERM)), done.stderr


def test_importing_the_trainer_leaves_ctrl_c_to_whoever_imported_it():
    # Only the trainer's main() takes SIGINT once (train/preemption.py): a test session or a notebook keeps its own.
    code = ("import signal; import train.__main__; "
            "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    # Python installs its own handler only where SIGINT is not ignored, as it is for a test run in the background.
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)},
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr


# --- hang watchdog -------------------------------------------------------------------------------------

def beat_of(rank, step, step_at, time_, phase="train", step_time=0.1):
    return {"rank": rank, "hostname": f"n{rank}", "pid": 100 + rank, "phase": phase, "step": step,
            "step_at": step_at, "time": time_, "step_time_s": step_time}


def test_no_hang_while_every_rank_progressed_within_the_threshold():
    from train.watchdog import judge
    beats = {0: beat_of(0, 50, 940.0, 999.0), 1: beat_of(1, 50, 941.0, 999.5)}
    assert judge(beats, 1000.0, timeout_s=60, factor=10, fresh_s=6) is None
    # Set-up and finished ranks are never hung: the rendezvous timeout and the exit cover them.
    idle = {0: beat_of(0, 0, 0.0, 999.0, phase="rendezvous"), 1: beat_of(1, 9, 0.0, 999.0, phase="done")}
    assert judge(idle, 1000.0, timeout_s=60, factor=10, fresh_s=6) is None


def test_the_frozen_rank_is_named_even_though_its_peers_stalled_waiting_for_it():
    from train.watchdog import judge
    # Rank 2 froze at step 41 (its heartbeat stopped too); ranks 0 and 1 wait in step 42's all-reduce.
    beats = {0: beat_of(0, 41, 900.0, 999.0), 1: beat_of(1, 41, 900.1, 999.5), 2: beat_of(2, 41, 899.9, 900.2)}
    verdict = judge(beats, 1000.0, timeout_s=60, factor=10, fresh_s=6)
    assert (verdict.rank, verdict.node, verdict.pid, verdict.step, verdict.since) == (2, "n2", 102, 41, 899.9)
    assert verdict.stale_beat and verdict.threshold_s == 60
    # A rank alive but stuck behind (its own thread still beats) is named by its lower step.
    beats[2] = beat_of(2, 40, 899.0, 999.9)
    assert judge(beats, 1000.0, timeout_s=60, factor=10, fresh_s=6).rank == 2


def test_a_rank_frozen_during_set_up_is_named_but_a_slow_set_up_that_still_beats_is_not():
    from train.watchdog import judge
    # Rank 1 froze while building (SIGSTOP, a dead file system): its heartbeat stopped at 900; rank 0 waits for
    # it in the rendezvous or the first step's all-reduce, beating on.
    beats = {0: beat_of(0, 0, 990.0, 999.0, phase="rendezvous", step_time=None),
             1: beat_of(1, 0, 880.0, 900.0, phase="build", step_time=None)}
    verdict = judge(beats, 1000.0, timeout_s=60, factor=10, fresh_s=6)
    assert (verdict.rank, verdict.phase, verdict.stale_beat, verdict.threshold_s) == (1, "build", True, 60)
    # Ten minutes compiling DeepSpeed's ops is slow, not hung, while the process still beats.
    beats[1] = beat_of(1, 0, 400.0, 999.5, phase="build", step_time=None)
    assert judge(beats, 1000.0, timeout_s=60, factor=10, fresh_s=6) is None


def test_the_threshold_grows_with_the_median_step_time():
    from train.watchdog import judge
    slow = {r: beat_of(r, 7, 1000.0 - 90, 999.0, step_time=12.0) for r in range(2)}
    assert judge(slow, 1000.0, timeout_s=60, factor=10, fresh_s=6) is None  # 90 s < 10 x 12 s
    verdict = judge(slow, 1000.0 + 40, timeout_s=60, factor=10, fresh_s=6)
    assert verdict is not None and verdict.threshold_s == 120


def test_a_frozen_rank_alone_on_its_node_is_reported_without_waiting_for_a_stack_nobody_can_take(tmp_path,
                                                                                                 monkeypatch):
    from train import heartbeat, nodebeat, watchdog
    # Rank 1 froze on n2, where no other rank runs (py-spy reads only local processes); rank 0 on n1 declared.
    for rank, node, beat_time in ((0, "n1", 999.0), (1, "n2", 900.0)):
        nodebeat.Publisher(tmp_path, rank).publish(node, 0, beat_time, {
            rank: {**beat_of(rank, 41, 900.0, beat_time), "hostname": node}})
    (tmp_path / "stacks").mkdir()
    (tmp_path / "stacks" / "declared.json").write_text("{}\n")
    (tmp_path / "stacks" / "rank-0.txt").write_text('Thread "MainThread":\n  in all_reduce\n')
    beat = heartbeat.Heartbeat(tmp_path, every_s=2.0, clock=lambda: 1000.0)
    beat.identity = {"rank": 0, "local_rank": 0, "hostname": "n1", "pid": 100, "attempt": 0}
    dog = watchdog.Watchdog(beat, timeout_s=60, factor=10, clock=lambda: 1000.0)

    def no_waiting(seconds):
        raise AssertionError("waited for a stack no live rank on n2 can take")
    monkeypatch.setattr(watchdog.time, "sleep", no_waiting)
    dog.write_report({"rank": 1, "node": "n2", "step": 41, "since": 900.0, "pid": 101, "threshold_s": 60,
                      "stale_beat": True, "declared_by": 0, "phase": "train"})
    report = json.loads((tmp_path / "hang.json").read_text())
    assert report["stacks"]["1"].startswith("no stack: no live rank on n2 could read process 101")
    assert [g["ranks"] for g in report["groups"]] == [[0], [1]]


def test_stacks_group_identical_main_threads_largest_group_first():
    from train.watchdog import group, own_stacks
    waiting = 'Thread "MainThread":\n  File "a.py", line 1, in all_reduce\n'
    stacks = {0: waiting + '\nThread "hpcdist-heartbeat":\n  x\n', 1: waiting, 2: "(taken by py-spy)\n  f (b.py:9)",
              3: waiting}
    assert group(stacks) == [{"ranks": [0, 1, 3], "stack": waiting}, {"ranks": [2], "stack": stacks[2]}]
    mine = own_stacks()
    assert mine.startswith('Thread "MainThread"') and "test_stacks_group_identical" in mine


# ---- a node that vanished (train/watchdog.py) ------------------------------------------------------

def node_beat(rank: int, host: str, at: float, attempt: int = 0, phase: str = "train") -> dict:
    return {"rank": rank, "hostname": host, "time": at, "attempt": attempt, "phase": phase}


def test_a_node_whose_every_rank_stopped_beating_has_vanished():
    from train.watchdog import vanished

    me = {"rank": 0, "hostname": "n1", "attempt": 0}
    beats = {0: node_beat(0, "n1", 100.0), 1: node_beat(1, "n1", 100.0), 2: node_beat(2, "n2", 90.0),
             3: node_beat(3, "n2", 91.0)}
    assert vanished(beats, 100.0, me=me, lost_s=6.0) == ("n2", [2, 3], 91.0)
    # One rank of the node still beats: a frozen rank, not a dead node (the hang judge's case).
    assert vanished({**beats, 3: node_beat(3, "n2", 99.0)}, 100.0, me=me, lost_s=6.0) is None
    # This node is never judged lost by itself, an earlier attempt's files describe nothing, and a node
    # whose ranks ended (done, stopped, failed) left on purpose.
    assert vanished(beats, 100.0, me={**me, "hostname": "n2"}, lost_s=6.0) is None
    assert vanished({2: node_beat(2, "n2", 10.0, attempt=1)}, 100.0, me=me, lost_s=6.0) is None
    assert vanished({2: node_beat(2, "n2", 10.0, phase="done")}, 100.0, me=me, lost_s=6.0) is None


def test_a_node_whose_local_rank_0_stopped_publishing_has_vanished_a_frozen_rank_on_a_live_one_has_not(tmp_path):
    from train import heartbeat
    from train.watchdog import vanished
    now = [1000.0]
    run = tmp_path / "run"
    beats = beating(run, range(4), 60.0, tmp_path / "shm", clock=lambda: now[0])
    now[0] = 1010.0
    for b in beats[:3]:   # rank 3 (n2's local rank 1) froze: it hands nothing over any more
        b.write()
    beats[0].write(force=True)
    beats[2].write(force=True)
    me = beats[0].identity
    seen = heartbeat.read_all(run, beats[0].stage)
    assert seen[3]["time"] == 1000.0 and seen[3]["published"] == 1010.0  # republished, with its own old time
    assert vanished(seen, 1012.0, me=me, lost_s=6.0) is None
    # n2's local rank 0 dies: n2's file stops, which is what a vanished node is.
    now[0] = 1020.0
    beats[0].write(force=True)
    assert vanished(heartbeat.read_all(run, beats[0].stage), 1020.0, me=me, lost_s=6.0) == ("n2", [2, 3], 1010.0)


def test_a_hung_rank_on_a_live_node_is_named_from_its_own_beat_inside_the_node_file(tmp_path):
    from train import heartbeat
    from train.watchdog import judge
    now = [1000.0]
    run = tmp_path / "run"
    beats = beating(run, range(4), 60.0, tmp_path / "shm", clock=lambda: now[0])
    for b in beats:
        b.phase("train")
        b.stepped(5)
    now[0] = 1010.0
    for b in beats:
        if b.identity["rank"] != 3:
            b.stepped(6)  # rank 3's main thread hangs in step 6; its heartbeat thread still beats
        b.write()
    for b in beats[::2]:
        b.write(force=True)
    now[0] = 1100.0
    beats[2].write(force=True)
    seen = heartbeat.read_all(run)  # what a judge on another node reads: node files only
    verdict = judge(seen, 1100.0, timeout_s=60, factor=10, fresh_s=6)
    assert (verdict.rank, verdict.node, verdict.step, verdict.since, verdict.stale_beat) == (3, "n2", 5, 1000.0, True)


def test_a_frozen_local_rank_0_is_blamed_not_the_ranks_it_stopped_publishing():
    from train.watchdog import judge
    # n2's file stopped at 900 (its writer, rank 2, froze); rank 3's beat in it is no older than rank 2's.
    beats = {0: {**beat_of(0, 41, 900.0, 999.0), "published": 999.0},
             2: {**beat_of(2, 41, 900.0, 899.0), "published": 900.0},
             3: {**beat_of(3, 41, 900.0, 898.0), "published": 900.0}}
    assert judge(beats, 1000.0, timeout_s=60, factor=10, fresh_s=6).rank == 2


def test_the_first_nodes_judge_and_the_others_only_while_those_are_silent(tmp_path):
    from train import nodebeat
    from train.watchdog import Watchdog
    now = [1000.0]
    run = tmp_path / "run"
    beats = beating(run, range(6), 60.0, tmp_path / "shm", clock=lambda: now[0], nodes=3)
    dogs = [Watchdog(b, timeout_s=60, factor=10, clock=lambda: now[0]) for b in beats]
    assert [d.judges() for d in dogs] == [True, False, True, False, False, False]
    now[0] = 1200.0   # nodes 0 and 1 fell silent for 3 beats: node 2's local rank 0 steps in
    assert dogs[4].judges() and dogs[1].judges()   # and while its local rank 0 is frozen, rank 1 for n1
    nodebeat.stage(beats[0].stage, {"rank": 0, "time": 1200.0})
    assert not dogs[1].judges()


def test_only_one_rank_a_node_reads_the_watchdogs_shared_files_the_others_read_what_it_hands_over(tmp_path):
    from train import nodebeat
    from train.watchdog import DECLARED, LOST, Watchdog
    now = [1000.0]
    run = tmp_path / "run"
    beats = beating(run, range(4), 60.0, tmp_path / "shm", clock=lambda: now[0], nodes=2)
    dogs = [Watchdog(b, timeout_s=60, factor=10, clock=lambda: now[0]) for b in beats]
    assert [d.reads_shared() for d in dogs] == [True, False, True, False]
    lost = {"node": "n3", "ranks": [4], "since": 990.0, "attempt": 0}
    (run / "lost.json").write_text(json.dumps(lost))
    assert dogs[0].lost() == lost and dogs[2].lost() == lost
    assert dogs[1].lost() is None and dogs[3].lost() is None   # they never look at the run directory
    dogs[0].relay(True, LOST, lost)                            # node 0's reader, about to leave
    assert dogs[1].lost() == lost and dogs[3].lost() is None   # each node has its own stage
    (run / "stacks").mkdir()
    (run / "stacks" / "declared.json").write_text(json.dumps({"rank": 3, "declared_at": 1001.0}))
    dogs[3].relay(False, DECLARED, {"rank": 0, "declared_at": 1001.0})  # what a rank read in the stage stays there
    assert dogs[3].declared() is None and dogs[2].declared()["rank"] == 3
    now[0] = 1200.0   # node 1's local rank 0 froze: rank 3 reads the run directory itself
    nodebeat.stage(beats[2].stage, {"rank": 2, "time": 900.0})
    assert dogs[3].reads_shared() and dogs[3].declared()["rank"] == 3


def watched(tmp_path: Path, monkeypatch, clock, prepare=lambda beats: None) -> tuple[list, list, list]:
    """2 nodes x 2 ranks (two stages), each with its heartbeat and a running watchdog whose exits are recorded;
    ``prepare`` sets the beats up before the watchdogs start. Every watchdog file a rank reads is recorded as
    (rank, path)."""
    import threading

    from train import watchdog
    beats = beating(tmp_path / "run", range(4), 0.05, tmp_path / "shm", clock=clock, nodes=2)
    prepare(beats)
    exits, reads, rank_of = [], [], {}
    real = watchdog.jobfiles.json_object
    def read(path, *limit):
        reads.append((rank_of.get(threading.current_thread()), path))
        return real(path, *limit)
    monkeypatch.setattr(watchdog.jobfiles, "json_object", read)
    for rank, beat in enumerate(beats):
        dog = watchdog.Watchdog(beat, timeout_s=60, factor=10, clock=clock, exit=exits.append)
        beat.watch(dog)
        rank_of[dog._thread] = rank
    return beats, exits, reads


def test_every_rank_of_every_node_leaves_with_77_within_two_beats_of_lost_json_the_others_reading_their_stage(
        tmp_path, monkeypatch):
    run = tmp_path / "run"
    beats, exits, reads = watched(tmp_path, monkeypatch, time.time)
    try:
        time.sleep(0.2)
        (run / "lost.json").write_text(json.dumps({"node": "n3", "ranks": [4], "since": 1.0, "attempt": 0}))
        written = time.monotonic()
        wait_for(lambda: len(exits) == 4, timeout_s=10)
        took = time.monotonic() - written
    finally:
        for b in beats:
            b.finish("failed")
    assert exits == [77] * 4 and took < 1.0   # two beats of 0.05 s, with room for a loaded machine
    assert {rank for rank, path in reads if run in path.parents} == {0, 2}   # the local ranks 0 only
    assert all(beats[rank].stage in path.parents for rank, path in reads if rank in (1, 3))


def test_a_declared_hang_reaches_every_rank_the_judges_node_s_too_and_each_leaves_its_stack(tmp_path, monkeypatch):
    now = [1000.0]
    run = tmp_path / "run"
    # An earlier attempt's hang stays in the run directory: none of it is taken for this one's.
    (run / "stacks").mkdir(parents=True)
    for name in ("hang.json", *(f"stacks/rank-{r}.txt" for r in range(4))):
        (run / name).write_text("an earlier attempt's\n")
        os.utime(run / name, (1.0, 1.0))

    def rank_3_hangs_at_step_5(beats):
        for b in beats:
            b.phase("train")
            b.stepped(5)
        now[0] = 1100.0
        for b in beats[:3]:
            b.stepped(6)
        for b in beats:
            b.write()
        for b in beats[::2]:
            b.write(force=True)
    beats, exits, reads = watched(tmp_path, monkeypatch, lambda: now[0], rank_3_hangs_at_step_5)
    try:
        wait_for(lambda: len(exits) == 4, timeout_s=15)
    finally:
        for b in beats:
            b.finish("failed")
    assert exits == [76] * 4
    hang = json.loads((run / "hang.json").read_text())
    assert (hang["rank"], hang["node"], hang["step"]) == (3, "n2", 5) and hang["declared_by"] in (0, 2)
    assert sorted(hang["stacks"]) == ["0", "1", "2", "3"]
    assert not any(text.startswith(("no stack", "an earlier")) for text in hang["stacks"].values())
    assert {rank for rank, path in reads if run in path.parents} == {0, 2}


def test_a_slurmd_that_refuses_or_ignores_connections_does_not_answer():
    import socket as sockets

    from hpc.slurm.commands import slurmd_answers

    server = sockets.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        assert slurmd_answers("127.0.0.1", port)
    finally:
        server.close()
    assert not slurmd_answers("127.0.0.1", port)           # nothing listens any more: refused
    assert not slurmd_answers("no-such-node.invalid", port)


def test_every_rank_leaves_with_77_once_a_rank_named_a_lost_node(tmp_path):
    from train import heartbeat
    from train.watchdog import Watchdog

    beat = heartbeat.Heartbeat(tmp_path, every_s=0.05)
    beat.identity = {"rank": 1, "local_rank": 1, "hostname": "n1", "attempt": 2}
    exits = []
    dog = Watchdog(beat, timeout_s=60, factor=10, exit=exits.append)
    (tmp_path / "lost.json").write_text(json.dumps({"node": "n2", "ranks": [2], "since": 1.0, "attempt": 1}))
    assert dog.lost() is None                                # an earlier attempt's
    (tmp_path / "lost.json").write_text(json.dumps({"node": "n2", "ranks": [2], "since": 1.0, "attempt": 2}))
    dog.leave(dog.lost())
    assert exits == [77]


def test_a_ctrl_c_in_the_middle_of_a_record_torch_writes_is_the_interrupt_not_the_zip_error_closing_it_raises(
        tmp_path, monkeypatch):
    """Seen in CI: a Ctrl-C during a checkpoint ended the run in exit 1 with "unexpected pos" (closing the zip on
    the short record) instead of the one-line exit 130."""
    class CutShort(io.FileIO):
        writes = 0

        def write(self, data):
            CutShort.writes += 1
            if CutShort.writes == 3:
                super().write(bytes(data)[:10])
                raise KeyboardInterrupt
            return super().write(data)

    monkeypatch.setattr(checkpoint, "open", lambda path, mode: CutShort(path, mode), raising=False)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.put({"w": torch.zeros(1000), "v": torch.ones(1000)}, tmp_path / "x.pt")



@pytest.mark.parametrize("given,port", [("7000", 7000), ("\u00b2", 6818), ("0", 6818), ("70000", 6818), ("", 6818)])
def test_the_watchdog_asks_slurmd_on_the_port_the_batch_shell_exported_else_slurms_default(tmp_path, monkeypatch,
                                                                                           given, port):
    from train import heartbeat, watchdog

    monkeypatch.setenv("HPCDIST_SLURMD_PORT", given)
    assert watchdog.Watchdog(heartbeat.Heartbeat(tmp_path, every_s=2.0), timeout_s=60, factor=10).slurmd_port == port
