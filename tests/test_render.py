"""Golden files, shell lint, DeepSpeed config and template search of hpc.render."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from hpc import paths, profiles, render, submit
from hpc.spec import JobSpec, SpecError

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("HPCDIST_REGEN_GOLDEN") == "1"
REPO = Path(__file__).resolve().parent.parent
# The valid backend x launcher pairs; dp runs one process on one node.
COMBOS = [("ddp", "srun"), ("ddp", "torchrun"), ("deepspeed", "srun"), ("deepspeed", "torchrun"),
          ("deepspeed", "deepspeed"), ("dp", "srun")]
SCRIPTS = ("job.sbatch", "setup.sh", "task.sh", "step.sh", "requeue.sh")

# A fixed site so goldens depend on the templates alone, not on the shipped profiles.
SITE = profiles.parse("golden-site", {
    "partition": "gpu", "account": "proj", "gpus_per_node": 4, "cpus_per_task": 8,
    "modules": ["cuda/12.1"], "setup": ["ulimit -n 65536"], "env": {"NCCL_DEBUG": "WARN"},
    "network": {"NCCL_IB_HCA": "mlx5_0,mlx5_1", "NCCL_SOCKET_IFNAME": "ib0"},
})


def golden_spec(backend: str, launcher: str) -> JobSpec:
    # Fixed job dir and interpreter paths keep the goldens the same on every machine.
    return JobSpec(job_dir="/jobs/golden", job_name="golden", nodes=1 if backend == "dp" else 2,
                   gpus_per_node=2, backend=backend, launcher=launcher, time="00:30:00",
                   python="/opt/venv/bin/python", pythonpath="/src/hpcdist",
                   train_args=("--epochs", "1", "--batch-size", "64"))


def builtin() -> tuple[str, ...]:
    return (str(paths.templates_dir()),)


@pytest.mark.parametrize("backend,launcher", COMBOS)
def test_golden(backend: str, launcher: str) -> None:
    rendered = render.render(golden_spec(backend, launcher), SITE, search=builtin())
    for name in SCRIPTS:
        path = GOLDEN / f"{backend}-{launcher}" / name
        if REGEN:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(rendered.files[name])
        assert rendered.files[name] == path.read_text(), (
            f"{path} differs; if the change is intended rerun with HPCDIST_REGEN_GOLDEN=1")


@pytest.mark.parametrize("backend,launcher", COMBOS)
def test_scripts_pass_bash_n_and_shellcheck(tmp_path: Path, backend: str, launcher: str) -> None:
    rendered = render.render(golden_spec(backend, launcher), SITE, tmp_path / "job", search=builtin())
    for name in SCRIPTS:
        (tmp_path / name).write_text(rendered.files[name])
        subprocess.run(["bash", "-n", str(tmp_path / name)], check=True)
    if shutil.which("shellcheck") is None:
        # CI (scripts/setup.sh --slurm installs it) must not pass a lint it never ran.
        if os.environ.get("CI"):
            pytest.fail("shellcheck is not installed: run scripts/setup.sh --slurm (apt-get install shellcheck)")
        pytest.skip("shellcheck is not installed")
    for name in SCRIPTS:
        proc = subprocess.run(["shellcheck", str(tmp_path / name)], capture_output=True, text=True)
        assert proc.returncode == 0 and not proc.stdout, f"{name}:\n{proc.stdout}"


@pytest.mark.parametrize("backend,launcher", COMBOS)
def test_scripts_expand_an_empty_array_as_bash_before_4_4_does_under_set_u(backend: str, launcher: str) -> None:
    """bash 4.2 and 4.3 (RHEL/CentOS 7's) call an empty "${a[@]}" an unbound variable under set -u and end the
    script there (step.sh, before srun: every job's first step); ${a[@]+"${a[@]}"} means the same on every bash."""
    rendered = render.render(golden_spec(backend, launcher), SITE, search=builtin())
    for name in SCRIPTS:
        text = rendered.files[name]
        for found in re.finditer(r'"\$\{(\w+)\[@\]\}"', text):
            assert text[:found.start()].endswith(f"${{{found[1]}[@]+"), f"{name}: {found[0]} unguarded"


def test_launch_lines() -> None:
    files = render.render(golden_spec("ddp", "torchrun"), SITE, search=builtin()).files
    assert '--rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID"' in files["task.sh"]
    assert "nodes=${2:-2}\n" in files["step.sh"]  # an elastic relaunch passes fewer
    assert ('srun --kill-on-bad-exit=1 --nodes="$nodes" --ntasks=$((nodes * 1)) \\\n    --ntasks-per-node=1'
            in files["step.sh"])
    one = render.render(replace(golden_spec("ddp", "torchrun"), nodes=1), SITE, search=builtin()).files
    assert "--standalone --nnodes 1 --nproc_per_node 2" in one["task.sh"]
    srun = render.render(golden_spec("ddp", "srun"), SITE, search=builtin()).files
    assert "--ntasks-per-node=2" in srun["job.sbatch"] and "--gpus-per-node=2" in srun["job.sbatch"]
    assert "--ntasks-per-node=2" in srun["step.sh"] and "--ntasks=$((nodes * 2))" in srun["step.sh"]
    ds = render.render(golden_spec("deepspeed", "deepspeed"), SITE, search=builtin()).files
    assert '--node_rank="$SLURM_NODEID"' in ds["task.sh"] and "--module train" in ds["task.sh"]
    assert "--deepspeed-config /jobs/golden/deepspeed.json" in ds["task.sh"]
    assert "hostfile --from-slurm --slots 2" in ds["setup.sh"]


def test_deepspeed_launcher_arguments_exist() -> None:
    # Read, not imported: importing deepspeed would import torch.
    found = importlib.util.find_spec("deepspeed")
    if found is None or found.origin is None:
        pytest.skip("deepspeed is not installed")
    source = (Path(found.origin).parent / "launcher" / "launch.py").read_text()
    for name in ("--world_info", "--node_rank", "--master_addr", "--master_port", "--module"):
        assert f'"{name}"' in source


def test_spare_nodes_are_held_by_the_allocation_and_left_free_by_the_step() -> None:
    spec = replace(golden_spec("ddp", "srun"), spare_nodes=1)
    rendered = render.render(spec, SITE, search=builtin())
    sbatch, step = rendered.files["job.sbatch"], rendered.files["step.sh"]
    # The allocation survives a node's death (--no-kill) and holds the spare; the step asks for its own nodes.
    assert "#SBATCH --nodes=3\n" in sbatch and "#SBATCH --no-kill\n" in sbatch
    assert "nodes=${2:-2}\n" in step and '--nodes="$nodes" --ntasks=$((nodes * 2))' in step
    assert 'relaunch=(--exclude="$exclude" --overlap)' in step
    params = submit.slurm_parameters(rendered)
    assert params["nodes"] == 3 and params["additional_parameters"]["no-kill"] is True
    assert {"--nodes=2", "--ntasks=4"} <= set(params["srun_args"])


def test_spare_nodes_are_bounded_and_never_mixed_with_a_nodelist() -> None:
    with pytest.raises(SpecError, match="--spare-nodes -1: give 0 to"):
        render.render(replace(golden_spec("ddp", "srun"), spare_nodes=-1), SITE, search=builtin())
    with pytest.raises(SpecError, match="drop --nodelist or --spare-nodes"):
        render.render(replace(golden_spec("ddp", "srun"), spare_nodes=1, nodelist="n[1-2]"), SITE, search=builtin())


def test_a_relaunch_runs_the_same_step_off_the_failed_nodes(tmp_path: Path) -> None:
    """step.sh with EXCLUDE: the same srun line plus --exclude and --overlap (a dead node's step lingers)."""
    rendered = render.render(golden_spec("ddp", "srun"), SITE, tmp_path / "job", search=builtin())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (bin_dir / "srun").chmod(0o755)
    (tmp_path / "step.sh").write_text(rendered.files["step.sh"])
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_ARGS": str(tmp_path / "args")}
    subprocess.run(["bash", str(tmp_path / "step.sh")], env=env, check=True)
    first = (tmp_path / "args").read_text().splitlines()
    assert "--overlap" not in first and not any(a.startswith("--exclude") for a in first)
    subprocess.run(["bash", str(tmp_path / "step.sh"), "n2"], env=env, check=True)
    again = (tmp_path / "args").read_text().splitlines()
    assert again == first[:5] + ["--exclude=n2", "--overlap"] + first[5:]


def test_the_batch_shell_goes_on_when_scontrol_cannot_reach_the_controller(tmp_path: Path) -> None:
    """job.sbatch sources setup.sh under set -euo pipefail: a controller that does not answer `scontrol show config`
    (restarting, failing over) leaves the ranks Slurm's default slurmd port, not a job that ends before its step."""
    site = replace(SITE, modules=(), setup=())  # neither `module` nor a raised ulimit here
    render.write(render.render(golden_spec("ddp", "srun"), site, tmp_path / "job", search=builtin()))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'Unable to contact slurm controller' >&2\nexit 1\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="7")
    setup = shlex.quote(str(tmp_path / "job" / "setup.sh"))
    script = f'set -euo pipefail; source {setup}; echo "port=$HPCDIST_SLURMD_PORT"'
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "port=", (out.stdout, out.stderr)


@pytest.mark.parametrize("shell", ["batch", "local task"])
def test_a_launchers_variables_from_the_submitting_shell_never_reach_the_ranks(tmp_path: Path, shell: str) -> None:
    """sbatch (and the local runner) pass the submitter's environment on: RANK=0 WORLD_SIZE=1 there made every task
    of a 2-node job rank 0 of a world of one, training alone; MASTER_ADDR=localhost, each node its own rendezvous.
    setup.sh drops them; the profile's env may still set them."""
    site = replace(SITE, modules=(), setup=(), env=(("MASTER_PORT", "23456"),))
    render.write(render.render(golden_spec("ddp", "srun"), site, tmp_path / "job", search=builtin()))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="7", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
               LOCAL_WORLD_SIZE="1", GROUP_RANK="0", MASTER_ADDR="localhost", MASTER_PORT="29500")
    if shell == "local task":
        env["SLURM_STEP_ID"] = "0"
    setup = shlex.quote(str(tmp_path / "job" / "setup.sh"))
    out = subprocess.run(["bash", "-c", f"source {setup}; env"], env=env, capture_output=True, text=True, timeout=60)
    seen = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR"} & set(seen)
    assert seen["MASTER_PORT"] == "23456"


@pytest.mark.parametrize("path", ["sbatch", "submitit", "local"])
def test_a_failing_site_setup_line_stops_the_job_in_one_line_on_every_submit_path(tmp_path: Path, path: str) -> None:
    """job.sbatch sources setup.sh under set -euo pipefail, submitit's batch script and the local runner under no
    option: a site's failing setup line stopped the first silently and was passed over by the others, whose step
    then ran in a half-set-up environment. Every path now stops there, naming it."""
    site = replace(SITE, modules=(), setup=("echo site-setup-start", "ls /no/such/site/path", "echo site-setup-on"))
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho 0\n")  # `python -m hpc attempt number`
    python.chmod(0o755)
    (tmp_path / "scontrol").write_text("#!/bin/sh\n")
    (tmp_path / "scontrol").chmod(0o755)
    rendered = render.render(replace(golden_spec("ddp", "srun"), python=str(python)), site, tmp_path / "job",
                             search=builtin())
    render.write(rendered)
    (tmp_path / "job" / "task.sh").write_text("echo the-step-ran\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="7", PATH=f"{tmp_path}:{os.environ['PATH']}")
    script = {"sbatch": f"set -euo pipefail\nsource {shlex.quote(str(tmp_path / 'job' / 'setup.sh'))}",
              "submitit": "\n".join(rendered.setup), "local": rendered.local_task}[path]
    if path == "local":
        env["SLURM_STEP_ID"] = "0"
    else:
        script += f"\nbash {shlex.quote(str(tmp_path / 'job' / 'task.sh'))}"
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "site-setup-on" not in out.stdout and "the-step-ran" not in out.stdout, out
    said = [line for line in out.stderr.splitlines() if line.startswith("hpcdist:")]
    assert len(said) == 1 and "golden-site" in said[0] and "setup line" in said[0], out.stderr


@pytest.mark.timed
def test_a_sigterm_in_the_batch_shells_first_moments_still_lets_the_attempt_be_recorded(tmp_path: Path) -> None:
    """Slurm's SIGTERM (a cancel, the time limit) may come while setup.sh still numbers the attempt (a python
    start, ~0.3 s): the batch shell must already hold its handler then, or it dies unrecorded and never requeues."""
    site = replace(SITE, modules=(), setup=())
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\nsleep 1; echo 0\n")  # `python -m hpc attempt number`, slow as a cold start
    python.chmod(0o755)
    spec = replace(golden_spec("ddp", "srun"), python=str(python))
    render.write(render.render(spec, site, tmp_path / "job", search=builtin()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="7", PATH=f"{tmp_path}:{os.environ['PATH']}")
    setup = shlex.quote(str(tmp_path / "job" / "setup.sh"))
    shell = subprocess.Popen(["bash", "-c", f"set -euo pipefail; source {setup}; echo on-to-the-step"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.1)
    shell.send_signal(signal.SIGTERM)
    out, err = shell.communicate(timeout=30)
    assert shell.returncode == 0 and out.splitlines()[-1] == "on-to-the-step", (shell.returncode, out, err)
    assert "the batch shell got SIGTERM" in err


@pytest.mark.parametrize("fails", [False, True])
def test_the_reference_hostfile_is_written_whole_or_left_alone_and_never_ends_the_job(tmp_path: Path,
                                                                                        fails: bool) -> None:
    """DeepSpeed's per-node launcher reads SLURM_JOB_NODELIST itself: the batch shell's hostfile is for reference.
    Its command failing ended the job before its step, unrecorded (job.sbatch's set -e), after emptying the file."""
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\ncase "$*" in\n  *hostfile*) ' + ('echo "no hosts" >&2; exit 1' if fails else
                      'printf "n1 slots=2\\nn2 slots=2\\n"') + ';;\n  *attempt*) echo 0;;\n  *) exit 1;;\nesac\n')
    python.chmod(0o755)
    spec = replace(golden_spec("deepspeed", "deepspeed"), python=str(python))
    render.write(render.render(spec, replace(SITE, modules=(), setup=()), tmp_path / "job", search=builtin()))
    (tmp_path / "job" / "hostfile").write_text("n7 slots=2\n")  # an earlier attempt's
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n[1-2]", PATH=f"{tmp_path}:{os.environ['PATH']}")
    setup = shlex.quote(str(tmp_path / "job" / "setup.sh"))
    done = subprocess.run(["bash", "-c", f"set -euo pipefail; source {setup}; echo on-to-the-step"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "on-to-the-step", done
    written = (tmp_path / "job" / "hostfile").read_text()
    assert written == ("n7 slots=2\n" if fails else "n1 slots=2\nn2 slots=2\n")
    assert ("no hosts" in done.stderr) == fails


@pytest.mark.timed
def test_the_batch_shells_lost_node_watch_ends_the_step_it_saw_never_the_relaunch(tmp_path: Path) -> None:
    """setup.sh's watch ends the step whose srun ran while run/lost.json stood; once requeue.sh has acted on the
    marker (removed it) and relaunched, the new step's srun is left alone, whenever within the watch's wait."""
    rendered = render.render(golden_spec("ddp", "srun"), SITE, tmp_path / "job", search=builtin())
    text = rendered.files["setup.sh"]
    watch = text[text.index("( trap - TERM"):text.index("done ) &") + len("done ) &")]
    run = tmp_path / "job" / "run"
    run.mkdir(parents=True)
    shutil.copy("/bin/sleep", tmp_path / "srun")  # a process named srun, as pgrep -x sees it
    script = f"""cd {shlex.quote(str(tmp_path))}
echo '{{"node": "n2"}}' > job/run/lost.json
./srun 30 & seen=$!
{watch}
sleep 0.3                                   # the watch has seen the marker and the step, and waits
rm job/run/lost.json; kill -KILL $seen; wait $seen
./srun 30 & relaunch=$!                     # requeue.sh's relaunch, within the watch's wait
sleep 2
kill -0 $relaunch && echo relaunch-alive; kill $relaunch
echo '{{"node": "n3"}}' > job/run/lost.json   # the relaunch loses a node in turn
./srun 30 & lost=$!
sleep 2.5
kill -0 $lost 2>/dev/null || echo lost-ended
"""
    out = subprocess.run(["setsid", "--wait", "bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["relaunch-alive", "lost-ended"], (out.stdout, out.stderr)
    assert out.stderr.count("ending the step") == 1 and '{"node": "n3"}: ending the step' in out.stderr


def test_cpu_job_uses_ntasks_per_node() -> None:
    local = profiles.load("local")
    spec = JobSpec(job_dir="/jobs/cpu", nodes=3, ntasks_per_node=2, backend="ddp", python="python3",
                   train_args=("--batch-size", "60"))
    rendered = render.render(spec, local)
    assert "#SBATCH --ntasks-per-node=2" in rendered.files["job.sbatch"]
    assert "gpus-per-node" not in rendered.files["job.sbatch"]
    params = submit.slurm_parameters(rendered)
    assert params["ntasks_per_node"] == 2 and "gpus_per_node" not in params
    assert rendered.setup == ("source /jobs/cpu/setup.sh",)
    assert submit.task_command(rendered) == ("bash", "/jobs/cpu/task.sh")


def test_submitit_and_local_lines_come_from_templates_with_the_job_dir_quoted(tmp_path) -> None:
    job_dir = tmp_path / "it's $(here)"
    spec = JobSpec(job_dir=str(job_dir), nodes=2, backend="ddp", python="python3")
    rendered = render.render(spec, profiles.load("local"))
    q = shlex.quote
    assert rendered.setup == (f"source {q(str(job_dir / 'setup.sh'))}",)
    assert rendered.teardown == (f'bash {q(str(job_dir / "requeue.sh"))} "$?"',)
    setup, task = q(str(job_dir / "setup.sh")), q(str(job_dir / "task.sh"))
    assert rendered.local_task == f"set -e; source {setup}; exec bash {task}"
    for line in (*rendered.setup, *rendered.teardown, rendered.local_task):
        assert "\n" not in line
        assert subprocess.run(["bash", "-n", "-c", line]).returncode == 0


def test_deepspeed_config_overrides() -> None:
    spec = replace(golden_spec("deepspeed", "srun"), zero_stage=3, precision="bf16")
    config = json.loads(render.render(spec, SITE, search=builtin()).files["deepspeed.json"])
    assert config["zero_optimization"]["stage"] == 3
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert config["train_batch_size"] == 64 and config["train_micro_batch_size_per_gpu"] == 16
    with pytest.raises(SpecError, match="global batch 10 does not split evenly over 4 ranks"):
        render.render(replace(spec, train_args=("--batch-size", "10")), SITE, search=builtin())


def test_hostfile_written_offline_with_nodelist() -> None:
    spec = replace(golden_spec("deepspeed", "deepspeed"), nodelist="n[1-2]")
    files = render.render(spec, SITE, search=builtin()).files
    assert files["hostfile"] == "n1 slots=2\nn2 slots=2\n"
    assert "#SBATCH --nodelist=n[1-2]" in files["job.sbatch"]


def test_site_templates_override_and_strict_undefined(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "setup.sh.j2").write_text("# site setup for {{ profile.name }}\n")
    rendered = render.render(golden_spec("ddp", "srun"), SITE, search=(str(site), *builtin()))
    assert rendered.files["setup.sh"] == "# site setup for golden-site\n"
    assert "srun --kill-on-bad-exit=1" in rendered.files["step.sh"]
    (site / "setup.sh.j2").write_text("{{ no_such_variable }}\n")
    with pytest.raises(render.RenderError, match="no_such_variable"):
        render.render(golden_spec("ddp", "srun"), SITE, search=(str(site), *builtin()))


def test_search_path_order(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    site = replace(SITE, templates=str(tmp_path / "a"))
    got = render.search_path(site, {"HPCDIST_TEMPLATES": str(tmp_path / "b")})
    assert got == (str(tmp_path / "a"), str(tmp_path / "b"), str(paths.templates_dir()))


def test_write_is_all_or_nothing(tmp_path: Path) -> None:
    rendered = render.render(golden_spec("ddp", "srun"), SITE, tmp_path / "job", search=builtin())
    render.write(rendered)
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == [
        ".hpcdist-job", "job.sbatch", "logs", "ranks.txt", "requeue.sh", "run", "setup.sh", "spec.yaml", "step.sh",
        "task.sh"]
    with pytest.raises(render.RenderError, match="already exists"):
        render.write(rendered)
    render.write(rendered, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job"]


def test_auto_backend_picks_ddp_where_the_model_fits_and_says_why() -> None:
    site = replace(SITE, gpu_memory=80 * 10**9)
    spec = replace(golden_spec("ddp", "srun"), backend="auto", params=1_300_000_000)
    chosen = render.render(spec, site, search=builtin()).spec
    assert chosen.backend == "ddp" and "fit" in chosen.backend_reason


def test_auto_backend_partitions_what_does_not_fit() -> None:
    site = replace(SITE, gpu_memory=80 * 10**9)
    spec = replace(golden_spec("ddp", "srun"), backend="auto", params=15_000_000_000, precision="bf16")
    chosen = render.render(spec, site, search=builtin()).spec
    assert (chosen.backend, chosen.zero_stage, chosen.offload) == ("deepspeed", 3, False)
    assert "ZeRO-2 needs" in chosen.backend_reason


def test_auto_backend_plans_deepspeed_in_the_precision_it_will_train_not_in_fp32() -> None:
    """With --precision auto the plan weighed ZeRO as fp32 (ZeRO-1 77.0 GB, so ZeRO-2 at 56.0 GB) and printed
    that as fact, while the job trains in the config's fp16, where ZeRO-1 needs 49.0 GB."""
    site = replace(SITE, gpu_memory=80 * 10**9)
    spec = replace(golden_spec("ddp", "srun"), backend="auto", params=7_000_000_000)
    rendered = render.render(spec, site, search=builtin())
    assert (rendered.spec.backend, rendered.spec.zero_stage, rendered.spec.precision) == ("deepspeed", 1, "fp16")
    assert rendered.spec.backend_reason.endswith("over 4 GPUs needs 49.0 GB in fp16 at DDP's communication volume")


def test_auto_backend_offloads_only_when_nothing_fits_on_the_gpus() -> None:
    site = replace(SITE, gpu_memory=80 * 10**9)
    spec = replace(golden_spec("ddp", "srun"), backend="auto", params=70_000_000_000, precision="bf16")
    rendered = render.render(spec, site, search=builtin())
    assert rendered.spec.offload and "offload" in rendered.spec.backend_reason
    zero = json.loads(rendered.files["deepspeed.json"])["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="sbatch is not on PATH")
def test_sbatch_test_only(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run(
        [sys.executable, "-m", "hpc", "render", "--nodes", "2", "--job-dir",
         str(tmp_path / "ok"), "--test-only", "-q"], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "to start at" in ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "hpc", "render", "--partition", "nosuchpartition",
         "--job-dir", str(tmp_path / "bad"), "--test-only", "-q"], capture_output=True, text=True,
        # hpcdist's own partition check would refuse first (tests/test_partition.py); this is Slurm's word.
        env={**env, "HPCDIST_PARTITION_CHECK": "0"}, timeout=300)
    # Refused: one line, exit 2, and the job directory render had just written is gone again.
    assert bad.returncode == 2 and "refused" in bad.stderr and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert not (tmp_path / "bad").exists()


def test_a_profile_env_the_ranks_would_refuse_is_refused_at_render_naming_the_profile() -> None:
    site = profiles.parse("typo", {"gpus_per_node": 4, "env": {"MASTER_PORT": "99999"}})
    with pytest.raises(SpecError, match="the env of cluster profile typo: MASTER_PORT=99999 is not a TCP port"):
        render.render(golden_spec("ddp", "srun"), site, search=builtin())
