"""Containers: which runtime runs each task, the command line it gets (checked against each tool's documented
form with stub commands that record their arguments), and what render refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpc import container as containers
from hpc.cli import main

REPO = Path(__file__).resolve().parents[1]
# What a job rendered here binds: for its job dir (under /tmp), this checkout and its interpreter's environment,
# and where their links lead (a venv's interpreter to its base one's).
BINDS = containers.binds(["/tmp", str(REPO)], sys.executable, containers.Container("apptainer", "img"),
                         os.path.realpath)


def profile(tmp_path: Path, **section: object) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text("extends: local\ncontainer: " + json.dumps(section) + "\n")
    return path


def render(tmp_path: Path, *args: str) -> tuple[int, str, Path]:
    job = tmp_path / "job"
    result = CliRunner().invoke(main, ["render", "-q", "-o", str(job), *args])
    return result.exit_code, result.stderr, job


# ---- deciding the container -------------------------------------------------------------------------

def test_the_jobs_image_and_runtime_win_over_the_profiles_and_none_means_the_host() -> None:
    site = containers.Container("apptainer", "/img/site.sif", mounts=("/scratch",), gpus=False)
    assert containers.resolve(None, None, None) is None
    assert containers.resolve(None, None, site).image == "/img/site.sif"
    mine = containers.resolve("/img/mine", "charliecloud", site)
    assert (mine.runtime, mine.image, mine.mounts, mine.gpus) == ("charliecloud", "/img/mine", ("/scratch",), False)
    assert containers.resolve("none", None, site) is None


def test_container_none_runs_the_task_on_the_host_whatever_image_the_profile_names(tmp_path: Path) -> None:
    """The checked spec said none, and render then took the profile's image again: the task ran in the container
    it was told not to."""
    site = profile(tmp_path, runtime="apptainer", image="docker://site/image")
    code, err, job = render(tmp_path, "--cluster", str(site))
    assert code == 0 and "apptainer exec" in (job / "task.sh").read_text(), err
    code, err, job = render(tmp_path, "--cluster", str(site), "--container", "none", "--force")
    assert code == 0, err
    assert "apptainer" not in (job / "task.sh").read_text()
    assert "container: none" in (job / "spec.yaml").read_text()


@pytest.mark.parametrize("image,runtime,words", [
    ("/img", None, "--container needs a runtime"),
    (None, "apptainer", "needs an image"),
    ("/img", "docker", "not one hpcdist runs"),
])
def test_a_container_that_cannot_be_decided_is_one_line(image, runtime, words) -> None:
    with pytest.raises(containers.ContainerError, match=words):
        containers.resolve(image, runtime, None)


@pytest.mark.parametrize("section,words", [
    ({"runtime": "charliecloud", "mounts": ["relative"]}, "absolute host path"),
    ({"runtime": "charliecloud", "mounts": ["/a:/b"]}, "absolute host path"),
    # The host's root or /opt over the image's: ch-run refuses '-b /' on the node, and /opt would hide its conda.
    ({"runtime": "charliecloud", "mounts": ["/"]}, "mounts: '/' is / or a folder the image's own root holds"),
    ({"runtime": "apptainer", "mounts": ["/scratch", "/opt/"]}, "mounts: '/opt/' is / or a folder the image's own"),
    ({"runtime": "podman-hpc", "env": ["A B"]}, "not a variable name"),
    ({"runtime": "apptainer", "gpus": "yes"}, "true or false"),
    ({"runtime": "apptainer", "shell": "x"}, "unknown key"),
    ({"runtime": ["apptainer"]}, "is not one hpcdist runs"),
    ({"runtime": {"name": "apptainer"}}, "is not one hpcdist runs"),
    ({"image": "/img"}, "container.runtime is missing; name the one the site runs: "),
])
def test_a_profiles_container_section_is_checked(tmp_path: Path, section: dict, words: str) -> None:
    code, err, _ = render(tmp_path, "--cluster", str(profile(tmp_path, **section)))
    assert code == 2 and len(err.splitlines()) == 1 and words in err, err


def test_binds_are_the_top_folders_of_what_the_task_needs_then_the_profiles_mounts() -> None:
    box = containers.Container("charliecloud", "/img", mounts=("/scratch/data",))
    assert containers.binds(["/work/repo/job", "/work/repo", None, "rel"], "/home/u/.pyenv/bin/python", box) == (
        "/work", "/home", "/scratch/data")


def test_under_a_folder_the_images_root_owns_only_the_folder_the_task_needs_is_bound() -> None:
    # The host's /opt over the image's would hide its conda, the host's /usr its Python and libraries.
    box = containers.Container("charliecloud", "/img")
    assert containers.binds(["/opt/jobs/x", "/usr/share/data/", "/var/tmp/run", "/opt/jobs/x/data", "/work/../srv/d"],
                            "/opt/conda/envs/t/bin/python", box) == (
        "/opt/jobs/x", "/usr/share/data", "/var/tmp/run", "/srv/d", "/opt/conda/envs/t")
    # An interpreter in the image's own /usr/bin is the image's: the host's /usr is not bound over it.
    assert containers.binds(["/work/job"], "/usr/bin/python3", box) == ("/work",)
    # A folder inside another bound is seen through it: charliecloud would need a mount point for nothing.
    assert containers.binds(["/opt/src/jobs/x", "/opt/src"], None, box) == ("/opt/src",)


def test_a_linked_folder_is_bound_where_its_link_leads_as_well() -> None:
    # A venv's interpreter links to its base one (pyenv under /root, conda under /opt), a data folder to a
    # parallel filesystem: inside, the link would lead nowhere.
    links = {"/home/u/venv": "/gpfs/u/venv", "/home/u/venv/bin/python": "/opt/py/3.11/bin/python3.11",
             "/home/u/data": "/lustre/cifar"}
    box = containers.Container("charliecloud", "/img")
    assert containers.binds(["/home/u/job", "/home/u/data"], "/home/u/venv/bin/python", box,
                            lambda path: links.get(path, path)) == ("/home", "/opt/py/3.11", "/lustre", "/gpfs")


def test_charliecloud_needs_a_mount_point_for_the_folder_bound_under_a_folder_the_image_owns(tmp_path: Path) -> None:
    image = tmp_path / "img"
    for sub in ("etc", "var", *BINDS):
        (image / sub.lstrip("/")).mkdir(parents=True, exist_ok=True)
    code, err, _ = render(tmp_path, "--container", str(image), "--container-runtime", "charliecloud", "--",
                          "--data-dir", "/var/tmp/hpcdist-data")
    assert code == 2 and "has no mount point /var/tmp/hpcdist-data" in err, err
    (image / "var/tmp/hpcdist-data").mkdir(parents=True)
    code, err, job = render(tmp_path, "--container", str(image), "--container-runtime", "charliecloud", "--",
                            "--data-dir", "/var/tmp/hpcdist-data")
    assert code == 0, err
    task = (job / "task.sh").read_text()
    assert "-b /var/tmp/hpcdist-data " in task and "-b /var " not in task


@pytest.mark.parametrize("runtime", ["apptainer", "podman-hpc"])
def test_an_image_that_would_read_as_the_runtimes_option_is_refused_from_the_command_line_or_the_profile(
        tmp_path: Path, runtime: str) -> None:
    code, err, job = render(tmp_path, "--container=--privileged", "--container-runtime", runtime)
    assert code == 2 and len(err.splitlines()) == 1 and "'--privileged' starts with '-'" in err, err
    assert not job.exists()
    code, err, job = render(tmp_path, "--cluster", str(profile(tmp_path, runtime=runtime, image="-v/:/host")))
    assert code == 2 and len(err.splitlines()) == 1 and "starts with '-'" in err, err
    assert not job.exists()


@pytest.mark.parametrize("runtime", ["apptainer", "pyxis"])
def test_a_bound_folder_whose_name_the_runtime_would_split_into_other_folders_is_refused(
        tmp_path: Path, runtime: str) -> None:
    # pyxis and apptainer split a bind list at ',' and each bind at ':': '/etc,x' would bind the host's /etc.
    code, err, job = render(tmp_path, "--container", "img", "--container-runtime", runtime, "--", "--data-dir",
                            "/etc,x/data")
    assert code == 2 and len(err.splitlines()) == 1 and "'/etc,x'" in err and "separator" in err, err
    assert not job.exists()
    code, err, job = render(tmp_path, "--cluster", str(profile(tmp_path, runtime=runtime, mounts=["/scratch,/etc"])))
    assert code == 2 and len(err.splitlines()) == 1 and "absolute host path" in err, err


def test_render_refuses_what_it_can_know(tmp_path: Path) -> None:
    image = tmp_path / "img"
    (image / "etc").mkdir(parents=True)
    code, err, _ = render(tmp_path, "--container", str(image), "--container-runtime", "charliecloud")
    assert code == 2 and "has no mount point /tmp" in err and "build-image.sh --mount /tmp" in err
    for sub in BINDS:
        (image / sub.lstrip("/")).mkdir(parents=True, exist_ok=True)
    code, err, _ = render(tmp_path, "--container", str(image), "--container-runtime", "charliecloud")
    assert code == 0, err
    for args, words in ((["--container", "rel/img", "--container-runtime", "charliecloud"], "relative path"),
                        (["--container", "/no/such/img", "--container-runtime", "oci"], "does not exist here")):
        code, err, _ = render(tmp_path, *args)
        assert code == 2 and len(err.splitlines()) == 1 and words in err, err


@pytest.mark.parametrize("runtime,image", [("apptainer", "img.sif"), ("singularity", "sandbox"),
                                           ("pyxis", "./pytorch.sqsh"), ("podman-hpc", "../img")])
def test_a_relative_image_file_is_refused_since_each_task_would_look_for_it_in_its_own_folder(
        tmp_path: Path, runtime: str, image: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Apptainer reads an image without a scheme (docker://, oras://, docker-archive:...) as a file.
    monkeypatch.chdir(tmp_path)
    Path(image).touch()
    code, err, job = render(tmp_path, "--container", image, "--container-runtime", runtime)
    assert code == 2 and len(err.splitlines()) == 1 and "relative path" in err, err
    assert not job.exists()
    code, err, _ = render(tmp_path, "--container", "/no/such.sif", "--container-runtime", runtime)
    assert code == 2 and "does not exist here" in err, err
    for uri in ("docker://pytorch/pytorch:2.4", "docker-archive:/img/pytorch.tar", "library://lolcow"):
        code, err, _ = render(tmp_path / uri.split(":")[0], "--container", uri, "--container-runtime", "apptainer")
        assert code == 0, err


def test_an_oci_bundle_whose_config_binds_none_of_a_folder_the_task_needs_is_refused(tmp_path: Path) -> None:
    # Slurm's srun --container binds nothing itself: only the bundle's config.json mounts reach the container.
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    mounts = [{"destination": "/proc", "type": "proc", "source": "proc"},
              {"destination": "/scratch", "type": "bind", "source": "/scratch", "options": ["rbind", "rw"]}]
    (bundle / "config.json").write_text(json.dumps({"mounts": mounts}))
    code, err, job = render(tmp_path, "--container", str(bundle), "--container-runtime", "oci")
    assert code == 2 and len(err.splitlines()) == 1 and f"binds no {BINDS[0]} " in err and "--mount" in err, err
    assert not job.exists()
    mounts += [{"destination": b, "type": "none", "source": b, "options": ["rbind"]} for b in BINDS]
    (bundle / "config.json").write_text(json.dumps({"mounts": mounts}))
    code, err, job = render(tmp_path, "--container", str(bundle), "--container-runtime", "oci")
    assert code == 0, err


def test_a_gpu_job_whose_runtime_would_hide_the_gpus_is_refused() -> None:
    box = containers.Container("podman-hpc", "img", gpus=False)
    with pytest.raises(containers.ContainerError, match="would hide them"):
        containers.check(box, (), gpus_per_node=4, local=False, exists=lambda p: True)
    containers.check(box, (), gpus_per_node=0, local=False, exists=lambda p: True)


def test_an_srun_plugin_runtime_is_refused_under_the_local_executor(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["submit", "--executor", "local", "-o", str(tmp_path / "j"), "--container",
                                       "img", "--container-runtime", "pyxis"])
    assert result.exit_code == 2 and "srun plugin" in result.stderr
    assert not (tmp_path / "j").exists()


# ---- the command line each runtime gets, as the tool documents it ---------------------------------------

RECORDER = """#!/bin/sh
# Records its arguments, one per line, then runs what follows the image, as the runtime would.
{ for a in "$@"; do printf '%s\\n' "$a"; done; } > "$RECORD"
"""


def run_task(tmp_path: Path, job: Path, stub: str) -> list[str]:
    """Run the rendered task.sh as Slurm task 0 with a stub for the runtime; the stub's argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / stub).write_text(RECORDER)
    (bin_dir / stub).chmod(0o755)
    record = tmp_path / "argv"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record), "PYTHONPATH": str(REPO),
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_STEP_ID": "0",
           "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "42", "SLURM_NNODES": "1"}
    subprocess.run(["bash", "-c", f"source {job}/setup.sh && bash {job}/task.sh"], env=env, check=True,
                   capture_output=True, timeout=300, cwd=job)
    return record.read_text().splitlines()


@pytest.mark.parametrize("runtime", ["apptainer", "singularity"])
def test_apptainer_exec_binds_each_folder_and_adds_nv_on_gpu_jobs(tmp_path: Path, runtime: str) -> None:
    code, err, job = render(tmp_path, "--container", "docker://pytorch/pytorch:2.4", "--container-runtime", runtime)
    assert code == 0, err
    argv = run_task(tmp_path, job, runtime)
    # apptainer exec [options] IMAGE COMMAND [ARGS]: every --bind before the image, the command after it.
    image = argv.index("docker://pytorch/pytorch:2.4")
    assert argv[0] == "exec" and "--nv" not in argv
    assert argv[1:image] == [x for b in BINDS for x in ("--bind", b)]
    assert argv[image + 1:image + 4] == [sys.executable, "-m", "train"] and "--run-dir" in argv
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    code, err, job = render(gpu, "--cluster", "example-ib", "--nodes", "1", "--gpus-per-node", "8", "--container",
                            "docker://pytorch/pytorch:2.4", "--container-runtime", runtime, "--launcher", "torchrun")
    assert code == 0, err
    assert f"exec {runtime} exec --nv --bind" in (job / "task.sh").read_text()


def test_podman_hpc_runs_on_the_hosts_network_and_passes_the_rank_environment(tmp_path: Path) -> None:
    code, err, job = render(tmp_path, "--container", "pytorch:2.4", "--container-runtime", "podman-hpc")
    assert code == 0, err
    argv = run_task(tmp_path, job, "podman-hpc")
    # podman-hpc run [options] IMAGE COMMAND [ARGS]
    image = argv.index("pytorch:2.4")
    options = argv[1:image]
    assert argv[0] == "run" and options[:7] == ["--rm", "--net", "host", "--ipc", "host", "--pid", "host"]
    assert ["-v", "/tmp:/tmp"] == options[7:9]
    passed = [options[i + 1] for i, o in enumerate(options) if o == "-e"]
    assert {"SLURM_*", "MASTER_*", "NCCL_*", "RANK", "WORLD_SIZE"} <= set(passed)
    assert options[-2:] == ["--workdir", str(job)]
    assert argv[image + 1:image + 3] == [sys.executable, "-m"]


def test_pyxis_and_oci_are_options_of_the_jobs_srun_step(tmp_path: Path) -> None:
    code, err, job = render(tmp_path, "--container", "nvcr.io#nvidia/pytorch:24.01-py3", "--container-runtime",
                            "pyxis")
    assert code == 0, err
    step, pyxis_requeue = (job / "step.sh").read_text(), (job / "requeue.sh").read_text()
    mounts = ",".join(f"{b}:{b}" for b in BINDS)
    assert f"'--container-image=nvcr.io#nvidia/pytorch:24.01-py3' --container-mounts={mounts}" in step
    from hpc import submit
    from hpc.commands.options import build

    rendered = build(None, container="nvcr.io#nvidia/pytorch:24.01-py3", container_runtime="pyxis",
                     job_dir=str(tmp_path / "again"))
    assert submit.slurm_parameters(rendered)["srun_args"][-2:] == [
        "--container-image=nvcr.io#nvidia/pytorch:24.01-py3", f"--container-mounts={mounts}"]
    assert "ch-run" not in (job / "task.sh").read_text()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    code, err, job = render(tmp_path / "o", "--container", str(bundle), "--container-runtime", "oci")
    assert code == 0, err
    assert f"--container={bundle}" in (job / "step.sh").read_text()
    # Requeued, an oci job starts again only once the old run's slurmstepd has torn its container down (Slurm
    # names it by job and step id alone); a pyxis one (as any other) at once.
    assert "StartTime=now+15 " in (job / "requeue.sh").read_text()
    assert "StartTime=now+2 " in pyxis_requeue


def test_a_task_names_a_runtime_its_node_lacks(tmp_path: Path) -> None:
    image = tmp_path / "img"
    for sub in ("etc", *BINDS):
        (image / sub.lstrip("/")).mkdir(parents=True, exist_ok=True)
    code, err, job = render(tmp_path, "--container", str(image), "--container-runtime", "charliecloud")
    assert code == 0, err
    # A node without ch-run: nothing on PATH (the check is a shell builtin).
    env = {"PATH": str(tmp_path / "empty"), "SLURM_PROCID": "0", "HOME": str(tmp_path)}
    proc = subprocess.run(["/bin/bash", str(job / "task.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "hpcdist-train: error: container runtime ch-run is not on PATH on" in proc.stderr


# ---- what a site offers: profile init drafts it ---------------------------------------------------------

def test_detect_finds_pyxis_in_plugstack_then_commands_on_path_then_oci_conf() -> None:
    plugstack = "# comment\nrequired /usr/lib/x86_64-linux-gnu/slurm/spank_pyxis.so runtime_path=/run/pyxis\n"
    on_path = {"apptainer", "ch-run"}.__contains__
    assert containers.detect(on_path, plugstack, oci_conf=True) == ["pyxis", "apptainer", "charliecloud", "oci"]
    assert containers.detect(lambda c: False, "# required spank_pyxis.so\n", oci_conf=False) == []


def test_profile_init_drafts_the_container_settings_it_found() -> None:
    import yaml

    from hpc import profiles
    from hpc.commands.profile import draft
    from hpc.partition import cluster_from

    data = Path(__file__).resolve().parent / "data" / "slurm"
    local = cluster_from(*(((data / f"local-{k}.txt").read_text()) for k in ("partitions", "nodes", "config")))
    found = yaml.safe_load(draft(local, None, "2026-12-05", runtimes=["pyxis", "apptainer"]))
    assert found["container"] == {"runtime": "pyxis"}
    assert profiles.parse("drafted", found).container.runtime == "pyxis"
    assert "container" not in yaml.safe_load(draft(local, None, "2026-12-05"))
