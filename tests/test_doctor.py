"""The network preflight's judgement: NCCL transport parsing and the InfiniBand fallback rule."""

import json

from hpc import doctor

IB_LOG = """\
n1:1234:1300 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/IB ; OOB ib0:10.1.0.1<0>
n1:1234:1300 [0] NCCL INFO Using network IB
n1:1234:1300 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM/read
n1:1234:1300 [0] NCCL INFO Channel 00/0 : 7[7] -> 8[0] [receive] via NET/IB/0/GDRDMA
"""
SOCKET_LOG = """\
n1:1234:1300 [0] NCCL INFO NET/IB : No device found.
n1:1234:1300 [0] NCCL INFO NET/Socket : Using [0]eth0:10.0.0.1<0>
n1:1234:1300 [0] NCCL INFO Using network Socket
n1:1234:1300 [0] NCCL INFO Channel 00 : 0[0] -> 1[0] [send] via NET/Socket/0
"""


def test_infiniband_channels_are_recognised():
    t = doctor.nccl_transport(IB_LOG)
    assert t.inter_node == {"IB"} and t.intra_node == {"P2P"}
    assert doctor.judge_transport(t, expect_ib=True).ok


def test_infiniband_through_nvidias_ibext_plugin_is_infiniband():
    # nccl-rdma-sharp-plugins (HPC-X, DGX sites) name their IB verbs transport IBext, IBext_v8, ...
    log = ("n1:1:1 [0] NCCL INFO Using network IBext_v8\n"
           "n1:1:1 [0] NCCL INFO Channel 00/0 : 7[7] -> 8[0] [receive] via NET/IBext_v8/0/GDRDMA\n")
    t = doctor.nccl_transport(log)
    assert t.inter_node == {"IBext_v8"}
    verdict = doctor.judge_transport(t, expect_ib=True, nodes=2)
    assert verdict.ok and "IBext_v8" in verdict.message


def test_socket_fallback_fails_when_the_profile_expects_infiniband():
    verdict = doctor.judge_transport(doctor.nccl_transport(SOCKET_LOG), expect_ib=True)
    assert not verdict.ok
    assert "fell back to sockets" in verdict.message and "NCCL_IB_HCA" in verdict.message


def test_sockets_are_fine_where_the_profile_disables_infiniband():
    assert doctor.judge_transport(doctor.nccl_transport(SOCKET_LOG), expect_ib=False).ok


def test_single_node_jobs_have_no_inter_node_transport():
    t = doctor.nccl_transport("NCCL INFO Channel 00 : 0[0] -> 1[1] via SHM/direct/direct\n")
    assert t.inter_node == frozenset() and t.intra_node == {"SHM"}
    assert doctor.judge_transport(t, expect_ib=True).ok


def test_a_job_across_nodes_whose_nccl_log_names_no_transport_between_them_fails_where_infiniband_is_expected():
    reports = [_report(0, backend="nccl", host="n1"), _report(1, backend="nccl", host="n2")]
    verdicts = doctor.judge(reports, 2, [""], expect_ib=True)
    assert [v.ok for v in verdicts] == [True, False]
    assert "no transport between the 2 nodes" in verdicts[-1].message
    assert doctor.judge(reports, 2, [""], expect_ib=False)[-1].ok
    one_node = [_report(0, backend="nccl"), _report(1, backend="nccl")]
    assert doctor.judge(one_node, 2, [""], expect_ib=True)[-1].ok


def test_allreduce_of_ones_must_equal_world_size():
    assert doctor.judge([_report(0, total=2.0), _report(1, total=2.0)], 2, [], expect_ib=False)[0].ok
    bad = doctor.judge([_report(0), _report(1, total=3.0, host="n2")], 2, [], expect_ib=False)
    assert not bad[0].ok and "rank 1 on n2: all-reduce of ones gave 3.0, expected 2" in bad[0].message


def _report(rank, total=2.0, host="n1", backend="gloo"):
    return doctor.RankReport(rank=rank, host=host, backend=backend, total=total, world_size=2, seconds=0.01)


def test_a_job_whose_ranks_all_report_the_right_sum_passes():
    verdicts = doctor.judge([_report(0, host="n1"), _report(1, host="n2")], 2, [], expect_ib=False)
    assert [v.ok for v in verdicts] == [True]
    assert "2 node(s) (n1, n2)" in verdicts[0].message


def test_a_rank_that_never_reported_is_named():
    verdicts = doctor.judge([_report(0)], 2, [], expect_ib=False)
    assert not verdicts[0].ok and "rank(s) 1 wrote no preflight report" in verdicts[0].message


def test_a_wrong_sum_names_the_rank_and_host():
    verdicts = doctor.judge([_report(0), _report(1, total=1.0, host="n2")], 2, [], expect_ib=False)
    assert [v.ok for v in verdicts] == [False] and "rank 1 on n2" in verdicts[0].message


def test_nccl_jobs_are_judged_on_their_transport_too():
    reports = [_report(0, backend="nccl"), _report(1, backend="nccl", host="n2")]
    verdicts = doctor.judge(reports, 2, [SOCKET_LOG], expect_ib=True)
    assert [v.ok for v in verdicts] == [True, False]
    assert doctor.judge(reports, 2, [IB_LOG], expect_ib=True)[-1].ok


def test_a_damaged_preflight_report_is_left_out_for_judging_to_name_as_missing(tmp_path) -> None:
    from hpc import vocab
    from hpc.commands.doctor import read_reports

    folder = tmp_path / vocab.PREFLIGHT
    folder.mkdir()
    good = {"rank": 0, "host": "n1", "backend": "gloo", "total": 2.0, "world_size": 3, "seconds": 0.1}
    (folder / "rank-0.json").write_text(json.dumps(good))
    (folder / "rank-1.json").write_text(json.dumps({**good, "rank": "1"}))
    (folder / "rank-2.json").write_bytes(b"\xff")
    assert [r.rank for r in read_reports(tmp_path)] == [0]


def test_doctor_for_one_rank_is_refused_before_anything_is_written_as_it_has_no_network_to_check(tmp_path) -> None:
    from click.testing import CliRunner

    from hpc.cli import main

    job = tmp_path / "doctor"
    result = CliRunner().invoke(main, ["doctor", "--executor", "local", "--cluster", "local", "-o", str(job)])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
    assert "one rank" in result.stderr and "--nodes 2" in result.stderr
    assert not job.exists()
