"""Read a YAML file a person wrote (job file, cluster profile): UTF-8 text, no key given twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class YamlError(ValueError):
    """A YAML file that cannot be read as asked; one line naming the file and the fix."""


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a mapping that names a key twice (YAML keeps the last silently)."""


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


def load(path: Path, what: str) -> Any:
    """The YAML document in ``path``; YamlError for a missing, unreadable, non-UTF-8 or malformed file."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except IsADirectoryError:
        raise YamlError(f"{what} {path} is a directory; give the YAML file itself") from None
    except OSError as exc:
        raise YamlError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
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
