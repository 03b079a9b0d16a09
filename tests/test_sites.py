"""Site installs: profiles and templates found through each level of the search path, the default cluster,
and profile inheritance (override, merge, cycles, unknown parents)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpc import paths, profiles, render, sites
from hpc.cli import main
from hpc.spec import JobSpec


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Path]:
    """Empty levels: two $HPCDIST_CLUSTERS entries, a user config dir and a system dir, all under tmp_path."""
    dirs = {"env1": tmp_path / "env1" / "clusters", "env2": tmp_path / "env2" / "clusters",
            "user": tmp_path / "xdg" / "hpcdist" / "clusters", "system": tmp_path / "etc" / "clusters"}
    for d in dirs.values():
        d.mkdir(parents=True)
    return dirs


def env_for(tmp_path: Path, site: dict[str, Path], **extra: str) -> dict[str, str]:
    return {"HPCDIST_CLUSTERS": f"{site['env1']}:{site['env2']}", "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
            "HPCDIST_SYSTEM_DIR": str(tmp_path / "etc"), "HOME": str(tmp_path / "home"), **extra}


def put(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_levels_are_env_entries_then_user_then_system_then_builtin(tmp_path: Path, site: dict[str, Path]) -> None:
    levels = sites.levels(env_for(tmp_path, site))
    assert [lv.origin for lv in levels] == ["$HPCDIST_CLUSTERS", "$HPCDIST_CLUSTERS", "user", "system", "built-in"]
    assert [lv.clusters for lv in levels[:4]] == [site["env1"], site["env2"], site["user"], site["system"]]
    assert levels[2].templates == tmp_path / "xdg" / "hpcdist" / "templates"
    assert levels[3].templates == tmp_path / "etc" / "templates"


def test_user_dir_defaults_to_dot_config_and_system_dir_to_etc() -> None:
    assert sites.user_dir({"HOME": "/home/ann"}) == Path("/home/ann/.config/hpcdist")
    assert sites.system_dir({}) == Path("/etc/hpcdist")


@pytest.mark.parametrize("present,expected", [
    (("env1", "env2", "user", "system"), "env1"),
    (("env2", "user", "system"), "env2"),
    (("user", "system"), "user"),
    (("system",), "system"),
])
def test_the_highest_level_wins(tmp_path: Path, site: dict[str, Path], present: tuple[str, ...],
                                expected: str) -> None:
    for level in present:
        put(site[level], "gpu.yaml", f"partition: from-{level}\n")
    loaded = profiles.load("gpu", env_for(tmp_path, site))
    assert loaded.partition == f"from-{expected}"
    assert loaded.source == str(site[expected] / "gpu.yaml")


def test_a_site_profile_shadows_the_builtin_one_and_a_path_beats_every_level(tmp_path: Path,
                                                                             site: dict[str, Path]) -> None:
    env = env_for(tmp_path, site)
    assert profiles.load("local", env).source == str(paths.configs_dir() / "clusters" / "local.yaml")
    system = put(site["system"], "local.yaml", "partition: site-debug\n")
    assert (profiles.load("local", env).partition, profiles.load("local", env).source) == ("site-debug", str(system))
    path = put(tmp_path, "mine.yaml", "partition: mine\n")
    assert (profiles.load(str(path), env).partition, profiles.load(str(path), env).source) == ("mine", str(path))
    found = {(f.name, f.origin): f for f in sites.discover(sites.levels(env))}
    assert found[("local", "built-in")].shadowed_by == "system"
    assert found[("local", "system")].shadowed_by is None


def test_default_cluster_env_then_user_config_then_system_config_then_local(tmp_path: Path,
                                                                           site: dict[str, Path]) -> None:
    env = env_for(tmp_path, site)
    assert sites.default_cluster(env) == ("local", "built-in default")
    system_conf = put(tmp_path / "etc", "config.yaml", "default_cluster: sysdef\n")
    assert sites.default_cluster(env) == ("sysdef", str(system_conf))
    user_conf = put(tmp_path / "xdg" / "hpcdist", "config.yaml", "default_cluster: userdef\n")
    assert sites.default_cluster(env) == ("userdef", str(user_conf))
    assert sites.default_cluster({**env, "HPCDIST_CLUSTER": "envdef"}) == ("envdef", "$HPCDIST_CLUSTER")


def test_a_bad_config_file_is_one_line_naming_the_valid_keys(tmp_path: Path, site: dict[str, Path]) -> None:
    put(tmp_path / "etc", "config.yaml", "default_clustr: x\n")
    with pytest.raises(sites.SiteError,
                       match="1 unknown key\\(s\\), the first 'default_clustr'; valid keys: default_cluster"):
        sites.default_cluster(env_for(tmp_path, site))


def test_render_takes_the_site_default_cluster(tmp_path: Path, site: dict[str, Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    put(site["system"], "mysite.yaml", "extends: local\npartition: sitepart\n")
    put(tmp_path / "etc", "config.yaml", "default_cluster: mysite\n")
    for key, value in env_for(tmp_path, site, HPCDIST_PARTITION_CHECK="0").items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(main, ["render", "-q", "--job-dir", str(tmp_path / "job")])
    assert result.exit_code == 0, result.output
    spec = (tmp_path / "job" / "spec.yaml").read_text()
    assert "cluster_profile: mysite" in spec and "partition: sitepart" in spec


def test_templates_beside_each_level_come_before_the_builtin_ones(tmp_path: Path, site: dict[str, Path]) -> None:
    env = env_for(tmp_path, site)
    (tmp_path / "etc" / "templates").mkdir()
    put(tmp_path / "etc" / "templates", "setup.sh.j2", "# the system's setup for {{ spec.job_name }}\n")
    (tmp_path / "xdg" / "hpcdist" / "templates").mkdir()
    search = render.search_path(profiles.load("local", env), env)
    assert search[:2] == (str(tmp_path / "xdg" / "hpcdist" / "templates"), str(tmp_path / "etc" / "templates"))
    assert search[-1].endswith("templates") and len(search) == 3
    files = render.render(JobSpec(job_dir=str(tmp_path / "job"), job_name="j"), profiles.load("local", env),
                          search=search).files
    assert files["setup.sh"] == "# the system's setup for j\n"


def test_extends_overrides_scalars_merges_env_and_network_and_replaces_lists(tmp_path: Path,
                                                                               site: dict[str, Path]) -> None:
    put(site["system"], "base.yaml", "partition: gpu\naccount: proj\ngpus_per_node: 8\nmodules: [cuda, nccl]\n"
        "env: {A: '1', B: '2'}\nnetwork: {ib: true, NCCL_IB_HCA: mlx5_0, NCCL_SOCKET_IFNAME: ib0}\n"
        "templates: tpl\n")
    put(site["user"], "short.yaml", "extends: base\npartition: gpu-short\naccount: null\nmodules: [cuda]\n"
        "env: {B: '3', A: null}\nnetwork: {NCCL_SOCKET_IFNAME: ib1}\ntime: '00:30:00'\n")
    child = profiles.load("short", env_for(tmp_path, site))
    assert (child.partition, child.account, child.gpus_per_node, child.time) == ("gpu-short", None, 8, "00:30:00")
    assert child.modules == ("cuda",)
    assert dict(child.env) == {"B": "3"}
    assert dict(child.network.variables) == {"NCCL_IB_HCA": "mlx5_0", "NCCL_SOCKET_IFNAME": "ib1"}
    # A relative templates path belongs to the file that wrote it.
    assert child.templates == str(site["system"] / "tpl")
    assert child.source == str(site["user"] / "short.yaml")


def test_a_site_profile_may_extend_the_builtin_of_its_own_name(tmp_path: Path, site: dict[str, Path]) -> None:
    site_local = put(site["system"], "local.yaml", "extends: local\nenv: {SITE: 'yes'}\n")
    loaded = profiles.load("local", env_for(tmp_path, site))
    # The built-in local's values, under the site's file.
    assert loaded.partition == "debug" and loaded.max_nodes == 3 and loaded.source == str(site_local)
    assert dict(loaded.env) == {"PYTHONUNBUFFERED": "1", "SITE": "yes"}


def test_an_extends_cycle_is_one_line_naming_the_chain(tmp_path: Path, site: dict[str, Path]) -> None:
    put(site["user"], "a.yaml", "extends: b\n")
    put(site["system"], "b.yaml", "extends: a\n")
    with pytest.raises(profiles.ProfileError) as info:
        profiles.load("a", env_for(tmp_path, site))
    message = str(info.value)
    assert "extends itself" in message and "\n" not in message
    assert message.index("a (") < message.index("b (") < message.rindex("a (")


def test_an_unknown_parent_is_one_line_naming_the_chain(tmp_path: Path, site: dict[str, Path]) -> None:
    put(site["user"], "a.yaml", "extends: b\n")
    put(site["system"], "b.yaml", "extends: nowhere\n")
    with pytest.raises(profiles.ProfileError) as info:
        profiles.load("a", env_for(tmp_path, site))
    message = str(info.value)
    assert "extends unknown profile 'nowhere'" in message and "\n" not in message
    assert "a (" in message and "b (" in message and message.endswith("to a clusters directory")


def test_the_lowest_profile_cannot_extend_its_own_name(tmp_path: Path, site: dict[str, Path]) -> None:
    put(site["system"], "solo.yaml", "extends: solo\n")
    with pytest.raises(profiles.ProfileError, match="extends unknown profile 'solo'"):
        profiles.load("solo", env_for(tmp_path, site))


def test_clusters_lists_origin_default_and_shadowing(tmp_path: Path, site: dict[str, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    put(site["system"], "local.yaml", "extends: local\n")
    put(site["env1"], "gpu.yaml", "partition: gpu\n")
    for key, value in env_for(tmp_path, site, HPCDIST_CLUSTER="gpu").items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(main, ["clusters", "--json"])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.output)
    rows = {(p["name"], p["origin"]): p for p in rep["profiles"]}
    assert rows[("gpu", "$HPCDIST_CLUSTERS")]["default"] is True
    assert rows[("local", "system")] | {"path": None} == {"name": "local", "origin": "system", "path": None,
                                                          "default": False, "shadowed_by": None, "extends": "local"}
    assert rows[("local", "built-in")]["shadowed_by"] == "system"
    assert rep["default"] == {"name": "gpu", "set_by": "$HPCDIST_CLUSTER", "found": True}
    text = CliRunner().invoke(main, ["clusters"]).output
    assert "shadowed by system" in text and "default cluster: gpu (set by $HPCDIST_CLUSTER)" in text


def test_clusters_says_a_default_cluster_path_that_names_no_file_is_not_found(tmp_path: Path, site: dict[str, Path],
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    put(tmp_path, "here.yaml", "partition: gpu\n")
    for missing, found in ((tmp_path / "gone.yaml", False), (tmp_path / ("x" * 300 + ".yaml"), False),
                           (tmp_path / "here.yaml", True)):
        for key, value in env_for(tmp_path, site, HPCDIST_CLUSTER=str(missing)).items():
            monkeypatch.setenv(key, value)
        assert json.loads(CliRunner().invoke(main, ["clusters", "--json"]).output)["default"]["found"] is found
        assert ("NOT FOUND" in CliRunner().invoke(main, ["clusters"]).output) is not found
