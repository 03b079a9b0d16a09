"""hpc.ports: the rendezvous port is the first free one from the preferred port, inside the derived range."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from slurm_fixtures import REPO

from hpc import ports, ranks


def held_port(start: int) -> tuple[socket.socket, int]:
    """A listening socket on the first port from ``start`` it could bind, and that port."""
    for port in range(start, ranks.PORT_BASE + ranks.PORT_SPAN):
        held = socket.socket()
        try:
            held.bind(("", port))
        except OSError:
            held.close()
            continue
        held.listen()
        return held, port
    raise AssertionError("no port to hold")


def test_a_free_preferred_port_is_the_one_chosen():
    held, port = held_port(ranks.PORT_BASE + 1234)
    held.close()
    assert ports.free_port(port) == port


def test_a_held_port_is_passed_over_for_the_next_free_one():
    held, port = held_port(ranks.PORT_BASE + 2345)
    with held:
        chosen = ports.free_port(port)
    assert chosen != port and port < chosen < ranks.PORT_BASE + ranks.PORT_SPAN


def test_the_search_wraps_to_the_start_of_the_range_not_into_the_ephemeral_ports():
    last = ranks.PORT_BASE + ranks.PORT_SPAN - 1
    held, port = held_port(last)
    with held:
        if port != last:
            pytest.skip(f"port {last} is held by another program here")
        chosen = ports.free_port(last)
    assert ranks.PORT_BASE <= chosen < last


def test_a_refused_bind_is_said_in_one_line_not_searched_past(monkeypatch):
    def refuse(self, address):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "bind", refuse)
    with pytest.raises(ports.PortError, match=r"^binding a port here failed \(Permission denied\)$"):
        ports.free_port(ranks.PORT_BASE)


def test_env_free_port_exports_the_first_free_port_from_the_one_the_job_id_derives():
    """What setup.sh evals in the batch shell: the port the ranks then take over the derived one."""
    derived = ranks.port_for_job("4242")
    held, port = held_port(derived)
    with held:
        done = subprocess.run([sys.executable, "-m", "hpc", "env", "--free-port"], capture_output=True, text=True,
                              cwd=REPO, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "SLURM_JOB_ID": "4242"})
    value = done.stdout.strip()
    assert done.returncode == 0 and value.isdigit(), done
    assert int(value) != port and derived <= int(value) < ranks.PORT_BASE + ranks.PORT_SPAN
    chosen = ranks.resolve({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "4242",
                            ranks.PICKED_MASTER_PORT: value})
    assert chosen.master_port == int(value) and chosen.origin["master_port"] == ranks.PICKED_MASTER_PORT


def test_env_free_port_without_a_job_id_exits_2_in_one_line():
    done = subprocess.run([sys.executable, "-m", "hpc", "env", "--free-port"], capture_output=True, text=True,
                          cwd=REPO, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and done.stdout == "" and len(done.stderr.splitlines()) == 1, done
    assert "MASTER_PORT" in done.stderr
