"""Specifications of hpc/ports.py: a Slurm job's rendezvous port is the one its id derives, else one no job id
derives, never in the kernel's ephemeral range."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hpc import ports, ranks
from hpc.commands import env

REPO = Path(__file__).resolve().parents[1]
LINUX = (32768, 60999)


def test_the_fallbacks_lie_above_the_derived_range_and_outside_the_ephemeral_one():
    assert ports.fallbacks(LINUX) == [*range(32000, 32768), *range(61000, 65536)]
    assert ports.fallbacks((1024, 65535)) == []
    assert ports.fallbacks((40000, 50000))[:1] == [32000] and 45000 not in ports.fallbacks((40000, 50000))


def test_the_derived_port_is_chosen_while_it_can_be_listened_on():
    assert ports.rendezvous_port("4242", LINUX, lambda port: True) == ranks.port_for_job("4242") == 16242


def test_a_held_derived_port_gives_way_to_a_fallback_never_to_a_neighbouring_job_s_derived_port():
    held = {16242, 32000, 32001}
    tried = []

    def can_listen(port: int) -> bool:
        tried.append(port)
        return port not in held
    assert ports.rendezvous_port("4242", LINUX, can_listen, start=0) == 32002
    assert tried == [16242, 32000, 32001, 32002]
    for job in range(4243, 4300):  # every neighbour that a step from 16242 would have met
        assert ports.rendezvous_port("4242", LINUX, can_listen) != ranks.port_for_job(str(job))


def test_the_search_from_a_random_start_wraps_round_the_fallbacks():
    last = ports.fallbacks(LINUX)[-1]
    assert ports.rendezvous_port("4242", LINUX, lambda port: port in (32000,), start=len(ports.fallbacks(LINUX)) - 1) \
        == 32000 and last == 65535


def test_no_port_at_all_is_said_in_one_line():
    with pytest.raises(ports.PortError, match=r"^16242 and every port of 32000-65535 outside 32768-60999 are taken"):
        ports.rendezvous_port("4242", LINUX, lambda port: False)
    with pytest.raises(ports.PortError, match=r"^16242 is taken and every port above 31999 is ephemeral here"):
        ports.rendezvous_port("4242", (1024, 65535), lambda port: False)


def test_the_ephemeral_range_is_read_from_proc_else_linux_s_default(tmp_path):
    (tmp_path / "range").write_text("20000\t50000\n")
    assert ports.ephemeral_range(tmp_path / "range") == (20000, 50000)
    (tmp_path / "range").write_text("garbage\n")
    assert ports.ephemeral_range(tmp_path / "range") == LINUX
    assert ports.ephemeral_range(tmp_path / "missing") == LINUX


def test_a_port_another_program_listens_on_cannot_be_listened_on_and_a_closed_one_can():
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert not ports.listenable(port)
    assert ports.listenable(port)


def test_a_connection_lingering_in_time_wait_does_not_hold_a_port():
    # torch's TCPStore listens with SO_REUSEADDR: a port the last attempt's connections left in TIME_WAIT is free.
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server's side closes first: its end lingers in TIME_WAIT
        client.close()
    assert ports.listenable(port)


def test_a_refused_bind_is_said_in_one_line_not_searched_past(monkeypatch):
    def refuse(self, address):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(socket.socket, "bind", refuse)
    with pytest.raises(ports.PortError, match=r"^binding a port here failed \(Permission denied\)$"):
        ports.listenable(16242)


def test_the_batch_shell_is_told_a_port_only_where_the_derived_one_is_held():
    job = {"SLURM_JOB_ID": "4242"}
    assert env.rendezvous_port(job, can_listen=lambda port: True) == ""
    chosen = env.rendezvous_port(job, can_listen=lambda port: port != 16242)
    assert int(chosen) in ports.fallbacks(ports.ephemeral_range())
    dist = ranks.resolve({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", **job, ranks.PICKED_MASTER_PORT: chosen})
    assert dist.master_port == int(chosen) and dist.origin["master_port"] == ranks.PICKED_MASTER_PORT


def test_env_rendezvous_port_with_the_derived_port_held_prints_a_fallback():
    derived = ranks.port_for_job("4242")
    with socket.socket() as holder:
        holder.bind(("", derived))
        holder.listen()
        done = subprocess.run([sys.executable, "-m", "hpc", "env", "--rendezvous-port"], capture_output=True,
                              text=True, cwd=REPO,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "SLURM_JOB_ID": "4242"})
    assert done.returncode == 0 and int(done.stdout) in ports.fallbacks(ports.ephemeral_range()), done


def test_env_rendezvous_port_without_a_job_id_exits_2_in_one_line():
    done = subprocess.run([sys.executable, "-m", "hpc", "env", "--rendezvous-port"], capture_output=True, text=True,
                          cwd=REPO, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and done.stdout == "" and len(done.stderr.splitlines()) == 1, done
    assert "MASTER_PORT" in done.stderr
