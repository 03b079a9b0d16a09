"""hpc.speccheck: a JobSpec checked against its cluster profile, the profile's defaults filled in."""

from __future__ import annotations

from dataclasses import replace

from hpc import profiles, speccheck
from hpc import spec as specs
from hpc.spec import JobSpec
from hpc.speccheck import check


def test_check_resolves_profile_defaults() -> None:
    site = profiles.load("example-ib")
    spec = check(JobSpec(job_dir="/j", nodes=2, backend="deepspeed", python="python3"), site)
    assert (spec.gpus_per_node, spec.cpus_per_task, spec.partition, spec.account) == (8, 12, "gpu", "my-project")
    assert spec.zero_stage == 2 and spec.world_size == 16 and spec.slurm_tasks_per_node == 8
    spec = check(replace(spec, launcher="torchrun"), site)
    assert spec.slurm_tasks_per_node == 1 and spec.procs_per_node == 8
    dp = check(JobSpec(job_dir="/j", backend="dp", python="python3"), site)
    assert dp.world_size == 1 and dp.gpus_per_node == 8
    assert check(replace(spec, time="90"), site).time_minutes == 90


def test_the_bounds_themselves_are_accepted() -> None:
    at_limit = specs.JobSpec(job_dir="/j", nodes=specs.MAX_NODES, ntasks_per_node=16,
                             cpus_per_task=specs.MAX_CPUS_PER_TASK)
    speccheck.check_sizes(at_limit)
    assert at_limit.world_size == specs.MAX_WORLD_SIZE
    speccheck.check_sizes(specs.JobSpec(job_dir="/j", ntasks_per_node=specs.MAX_TASKS_PER_NODE))


def test_elastic_is_for_every_backend_and_is_said_in_the_rendered_decision() -> None:
    import pytest

    site = profiles.load("example-ib")
    # DeepSpeed's ZeRO partitions are regrouped through a universal checkpoint (train/engines.py).
    assert check(JobSpec(job_dir="/j", nodes=2, backend="deepspeed", elastic=True, python="python3"), site).elastic
    assert check(JobSpec(job_dir="/j", nodes=2, backend="ddp", elastic=True, python="python3"), site).elastic
    assert specs.from_mapping({"job_dir": "/j", "elastic": True}).elastic
    with pytest.raises(specs.SpecError, match="elastic must be true or false"):
        specs.from_mapping({"job_dir": "/j", "elastic": "yes"})


def test_the_profiles_container_image_is_held_to_what_container_is_held_to() -> None:
    import pytest

    from hpc.container import Container

    local = profiles.load("local")
    for image, words in (("a b", "contains whitespace"), ("img\nc", "newline or control character")):
        site = replace(local, container=Container("pyxis", image))
        with pytest.raises(specs.SpecError, match=f"the profile's container.image .* {words}"):
            check(JobSpec(job_dir="/j", python="python3"), site)
        with pytest.raises(specs.SpecError, match=f"--container .* {words}"):
            check(JobSpec(job_dir="/j", python="python3", container=image), site)
