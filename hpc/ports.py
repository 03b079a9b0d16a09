"""Find the TCP port a job's rendezvous listens on: the first one free on this host from a preferred one.

    port = free_port(ranks.port_for_job(job_id))   # the batch shell, as an allocation starts
"""

from __future__ import annotations

import errno
import socket

from hpc import ranks


class PortError(Exception):
    """No port could be found; the message says why (the caller adds what to do)."""


def free_port(first: int) -> int:
    """The first port from ``first`` that no socket here holds, wrapping within the range ports are derived from
    (hpc.ranks: below the kernel's ephemeral range, where an outgoing connection could take it before rank 0
    listens). Nothing holds it until rank 0 listens: another program may still take it meanwhile (seconds)."""
    for offset in range(ranks.PORT_SPAN):
        port = ranks.PORT_BASE + (first - ranks.PORT_BASE + offset) % ranks.PORT_SPAN
        try:
            with socket.socket() as probe:
                probe.bind(("", port))
            return port
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise PortError(f"binding a port here failed ({exc.strerror})") from None
    raise PortError(f"every one of {ranks.PORT_BASE}-{ranks.PORT_BASE + ranks.PORT_SPAN - 1} is taken here")
