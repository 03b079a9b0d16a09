"""Judge a job's network from what its ranks report: NCCL's transport and the rendezvous reachability (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# NCCL_DEBUG=INFO names the transport of every channel it builds, e.g.
#   "NCCL INFO Channel 00/0 : 0[0] -> 1[1] [send] via NET/IB/0/GDRDMA"
#   "NCCL INFO Channel 00 : 1[1] -> 0[0] via NET/Socket/0"
#   "NCCL INFO Channel 00 : 0[0] -> 1[1] via P2P/CUMEM/read"
#   "NCCL INFO Channel 00/0 : 7[7] -> 8[0] [receive] via NET/IBext_v8/0/GDRDMA"   (NVIDIA's IB plugin)
_CHANNEL = re.compile(r"via (NET/\w+|P2P|SHM|COLLNET)")
_NET_PLUGIN = re.compile(r"NCCL INFO (?:Using network|NET/Plugin.*?using) (\w+)")


@dataclass(frozen=True)
class Transport:
    """What NCCL used between nodes (``IB``, ``Socket``) and within a node (``P2P``, ``SHM``)."""

    inter_node: frozenset[str]
    intra_node: frozenset[str]


def nccl_transport(log_text: str) -> Transport:
    """Read the transports out of NCCL_DEBUG=INFO output."""
    kinds = _CHANNEL.findall(log_text)
    inter = {kind.removeprefix("NET/") for kind in kinds if kind.startswith("NET/")}
    return Transport(frozenset(inter.union(_NET_PLUGIN.findall(log_text))),
                     frozenset(kind for kind in kinds if not kind.startswith("NET/")))


@dataclass(frozen=True)
class Verdict:
    ok: bool
    message: str


def judge_transport(transport: Transport, expect_ib: bool, nodes: int = 1) -> Verdict:
    """Fail when a profile asked for InfiniBand but NCCL fell back to sockets between ``nodes`` nodes, or named
    nothing it used between them (InfiniBand then unconfirmed)."""
    used = ", ".join(sorted(transport.inter_node)) or "none seen (single node?)"
    if expect_ib and nodes > 1 and not transport.inter_node:
        return Verdict(False, f"NCCL's log named no transport between the {nodes} nodes, so InfiniBand is "
                              "unconfirmed: check that run/preflight/nccl-*.log was written (NCCL_DEBUG=INFO)")
    if expect_ib and "Socket" in transport.inter_node:
        return Verdict(False, f"NCCL fell back to sockets between nodes (inter-node transport: {used}) although "
                              "the cluster profile expects InfiniBand: check NCCL_IB_HCA and that the IB "
                              "devices are visible in the job (ibv_devinfo), or set network.ib: false")
    if expect_ib and transport.inter_node and not any(kind.startswith("IB") for kind in transport.inter_node):
        return Verdict(False, f"NCCL used {used} between nodes, not InfiniBand, although the profile expects it")
    return Verdict(True, f"inter-node transport: {used}; intra-node: "
                         f"{', '.join(sorted(transport.intra_node)) or 'none seen'}")


@dataclass(frozen=True)
class RankReport:
    """What one rank's preflight wrote (``run/preflight/rank-R.json``)."""

    rank: int
    host: str
    backend: str
    total: float
    world_size: int
    seconds: float


def judge(reports: list[RankReport], world_size: int, nccl_logs: list[str], expect_ib: bool) -> list[Verdict]:
    """Every check of a preflight job: all ranks reported, each all-reduce summed right, NCCL's transport."""
    verdicts = []
    hosts = sorted({r.host for r in reports})
    missing = sorted(set(range(world_size)) - {r.rank for r in reports})
    if missing:
        verdicts.append(Verdict(False, f"rank(s) {', '.join(map(str, missing))} wrote no preflight report: "
                                       "they never joined the process group; see `hpcdist logs JOB`"))
    # An all-reduce of ones must sum to the world size on every rank.
    verdicts.extend(Verdict(False, f"rank {r.rank} on {r.host}: all-reduce of ones gave {r.total}, expected "
                                   f"{world_size}: ranks disagree on the world; check the launch geometry")
                    for r in reports if r.total != world_size)
    if reports and not missing and all(v.ok for v in verdicts):
        slowest = max(reports, key=lambda r: r.seconds)
        verdicts.append(Verdict(True, f"all-reduce across {world_size} ranks on {len(hosts)} node(s) "
                                      f"({', '.join(hosts)}) over {reports[0].backend}: ok, slowest rank "
                                      f"{slowest.rank} took {slowest.seconds:.3f} s"))
    if any(r.backend == "nccl" for r in reports):
        verdicts.append(judge_transport(nccl_transport("\n".join(nccl_logs)), expect_ib, len(hosts)))
    return verdicts
