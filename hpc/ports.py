"""Choose a Slurm job's rendezvous port on its batch host: the one its id derives, else one no job id derives.

    port = ports.rendezvous_port(job_id, ports.ephemeral_range(), ports.listenable)  # the batch shell (setup.sh)
"""

from __future__ import annotations

import errno
import random
import socket
from pathlib import Path
from typing import Callable

from hpc import ranks

# Linux's default, where /proc does not say: the ports the kernel hands to outgoing connections.
EPHEMERAL = (32768, 60999)


class PortError(Exception):
    """No port could be chosen; the message says why (the caller adds what to do)."""


def ephemeral_range(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> tuple[int, int]:
    """This host's ephemeral port range (it is per network namespace), else Linux's default."""
    try:
        low, high = (int(word) for word in path.read_text().split())
    except (OSError, ValueError):
        return EPHEMERAL
    return low, high


def fallbacks(ephemeral: tuple[int, int]) -> list[int]:
    """Ports above the derived range that the kernel never gives an outgoing connection: where a job whose derived
    port is held goes. Stepping on from the derived port instead lands on a neighbouring job id's port, free only
    until that job's rank 0 listens; two such jobs then meet in one rendezvous (seen in CI's drill)."""
    low, high = ephemeral
    return [port for port in range(ranks.PORT_BASE + ranks.PORT_SPAN, ranks.MAX_PORT + 1) if not low <= port <= high]


def listenable(port: int) -> bool:
    """Whether rank 0 could listen on ``port`` here now, tried the way torch's TCPStore listens (SO_REUSEADDR: a
    closed connection lingering in TIME_WAIT does not hold a port)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
            probe.listen()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise PortError(f"binding a port here failed ({exc.strerror})") from None
    return True


def rendezvous_port(job_id: str, ephemeral: tuple[int, int], can_listen: Callable[[int], bool],
                    start: int | None = None) -> int:
    """The port ``job_id`` derives where ``can_listen`` it, else the first fallback it can, from ``start`` (random:
    two jobs falling back at once rarely try the same ports in the same order). Nothing holds the port until rank 0
    listens: another program may still take it meanwhile (seconds)."""
    derived = ranks.port_for_job(job_id)
    if can_listen(derived):
        return derived
    others = fallbacks(ephemeral)
    if not others:
        raise PortError(f"{derived} is taken and every port above {ranks.PORT_BASE + ranks.PORT_SPAN - 1} is "
                        f"ephemeral here ({ephemeral[0]}-{ephemeral[1]})")
    start = random.randrange(len(others)) if start is None else start
    for offset in range(len(others)):
        if can_listen(port := others[(start + offset) % len(others)]):
            return port
    raise PortError(f"{derived} and every port of {others[0]}-{others[-1]} outside {ephemeral[0]}-{ephemeral[1]} "
                    "are taken here")
