"""The code's layout, as README's census states it: no import cycle (lazy imports included), the trainer
takes from hpc/ only its light modules, hpc/ never takes torch, and no module or function grows past what a
newcomer can read at once."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# What the trainer may import from hpc/: the vocabulary, rank resolution, the DeepSpeed config, and the
# writers and readers of the run directory. Nothing that speaks to Slurm or renders jobs.
TRAINER_TAKES = {"hpc.vocab", "hpc.ranks", "hpc.dsconfig", "hpc.runfiles", "hpc.fileio", "hpc.checkpoints",
                 "hpc.beatfile", "hpc.jobfiles", "hpc.slurm.commands", "hpc.shown"}


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {_name(p): p for folder in ("hpc", "train") for p in sorted((ROOT / folder).rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The project modules ``name`` imports anywhere in its text: at the top, in a function, or under
    TYPE_CHECKING (a cycle hidden in a function is still a cycle)."""
    known, found = modules(), set()
    for node in ast.walk(ast.parse(known[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
    return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    out.append(sorted(group))
    return out


def test_the_cycle_finder_finds_a_cycle_and_passes_a_tree():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycles_lazy_ones_included():
    graph = {name: imports_of(name) for name in modules()}
    assert sum(len(v) for v in graph.values()) > 100, "the scan must see the imports"
    assert cycles(graph) == []


def test_the_trainer_takes_only_light_modules_from_hpc():
    taken = {m for name in modules() if name.startswith("train") for m in imports_of(name) if m.startswith("hpc")}
    assert taken and taken <= TRAINER_TAKES, sorted(taken - TRAINER_TAKES)


def test_the_submit_side_never_imports_torch():
    for name, path in modules().items():
        if name.startswith("hpc"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n.split(".")[0] in ("torch", "deepspeed") for n in names), name


def test_no_module_is_longer_than_a_newcomer_reads_at_once():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_is_longer_than_a_screen():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length}")
    assert long == []


# Who may rename: the one atomic file write, the directory publishers, and the moves that set a file aside.
RENAMERS = {"hpc.fileio.atomic_write": "a file, written beside its place then renamed over it",
            "hpc.jobdir.write_tree": "a job or sweep directory, published whole",
            "train.checkpoint._publish": "a checkpoint directory, published whole",
            "train.checkpoint.choose": "a damaged checkpoint set aside, a step's copy a kill left aside put back",
            "train.nodebeat.Publisher._rotate": "a full heartbeat history moved to .1"}


def _renames(node: ast.AST) -> bool:
    """``os.replace(a, b)``, ``os.rename(a, b)`` or ``path.rename(b)``/``path.replace(b)`` (not str.replace)."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return False
    if node.func.attr not in ("replace", "rename"):
        return False
    via_os = isinstance(node.func.value, ast.Name) and node.func.value.id == "os"
    return via_os or len(node.args) == 1


def _renamers() -> set[str]:
    found = set()
    for name, path in modules().items():
        for owner in ast.walk(ast.parse(path.read_text())):
            body = getattr(owner, "body", None)
            for func in body if isinstance(body, list) else ():
                if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(map(_renames, ast.walk(func))):
                    where = f"{owner.name}." if isinstance(owner, ast.ClassDef) else ""
                    found.add(f"{name}.{where}{func.name}")
    return found


def test_one_atomic_write():
    assert _renamers() == set(RENAMERS)
