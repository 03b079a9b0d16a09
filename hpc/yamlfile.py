"""Read a YAML file a person wrote (job file, cluster profile, sweep file): bounded UTF-8 text, no key twice."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

from hpc import jobfiles

# Far beyond any profile, job or sweep file (the largest shipped is a few KB); bounds checked before parsing.
MAX_BYTES = 1 << 20
MAX_DEPTH = 64
# Nodes the document holds once its aliases are expanded: a 1 KB "billion laughs" file would be ~10^9.
MAX_NODES = 100_000


class YamlError(ValueError):
    """A YAML file that cannot be read as asked; one line naming the file and the fix."""


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a mapping that names a key twice (YAML keeps the last silently), and a
    document nested deeper than MAX_DEPTH or holding over MAX_NODES nodes with its aliases expanded, before
    any object is built."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: yaml.Node) -> Any:
        if _expanded_size(node) > MAX_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"its aliases expand to over {MAX_NODES} values; write the values out", node.start_mark)
        return super().construct_document(node)


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes ``root`` stands for with every alias expanded; each distinct node is visited once."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else (
            node.value if isinstance(node, yaml.SequenceNode) else [])
        if not done:
            stack.append((node, True))
            # A node met again while its children are open is a recursive alias: counted as one.
            sizes.setdefault(-id(node), 0)
            stack.extend((c, False) for c in children if id(c) not in sizes and -id(c) not in sizes)
            continue
        sizes[id(node)] = min(1 + sum(sizes.get(id(c), 1) for c in children), MAX_NODES + 1)
    return sizes[id(root)]


def _mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: the constructor below says so in its own words
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (line {key_node.start_mark.line + 1}); keep one",
                key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _as_written(number: Any, loader: _StrictLoader, node: yaml.ScalarNode) -> Any:
    """``number`` (YAML 1.1's int or float constructor) of ``node``, but a base-60 scalar as the text it is."""
    # YAML 1.1 reads an unquoted 2:00:00 as 7200 (base 60), which a time limit then takes as 7200 minutes;
    # a person writing it means Slurm's H:M:S, as YAML 1.2 reads it.
    return node.value if ":" in node.value else number(loader, node)


for _tag, _number in (("int", yaml.SafeLoader.construct_yaml_int), ("float", yaml.SafeLoader.construct_yaml_float)):
    _StrictLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", functools.partial(_as_written, _number))


def load(path: Path, what: str, follow: bool = True) -> Any:
    """The YAML document in ``path``; YamlError for a missing, unreadable, non-UTF-8, malformed, huge, deeply
    nested or alias-bombed file, and, without ``follow`` (a file hpcdist wrote), a symbolic link."""
    try:
        with jobfiles.open_regular(path, follow=follow) as f:
            data = f.read(MAX_BYTES + 1)
    except jobfiles.Damaged as exc:
        raise YamlError(f"{what}: {exc}; give the YAML file itself") from None
    except OSError as exc:
        raise YamlError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise YamlError(f"{what} {path} is over {MAX_BYTES} bytes, more than such a file holds; give the right file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlError(f"{what} {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None and "line" not in problem else ""
        raise YamlError(f"cannot read {what} {path}: {problem}{where}") from None
    except RecursionError:
        raise YamlError(f"cannot read {what} {path}: nested too deeply") from None
