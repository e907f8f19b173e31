"""The package's import graph: no cycles, and every import points down the layer order.

Every module under orchestrator/, actors/ and kernels/ is parsed with `ast` (nothing is
imported); module-level AND function-level (lazy) imports count, relative ones resolved.
Each module belongs to a group, and groups are ranked (lower never imports higher):

    errors, config, experience, wire -> rl, kernels, models, tasks, data, run, evidence -> actors -> ppo -> recipe, cluster, label -> cli

Groups of equal rank may import each other as long as the group graph stays acyclic. One
exception, explicit below: config validates reward names against the registry in tasks
(lazily, inside check_consistency). A control runs the same checks on a tiny planted graph.

Run: .venv/bin/pytest tests/unit/test_imports.py -q   (pure ast; under a second on one CPU)
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Import name -> folder (pyproject's package-dir mapping).
PACKAGES = {"rlhf.orchestrator": ROOT / "orchestrator", "rlhf.actors": ROOT / "actors", "rlhf.kernels": ROOT / "kernels"}
RANK = {"orchestrator": 0, "errors": 0, "config": 0, "config_base": 0, "config_stages": 0, "experience": 0, "wire": 0,
        "rl": 1, "kernels": 1, "models": 1, "tasks": 1, "data": 1, "run": 1, "evidence": 1,
        "actors": 2, "ppo": 3, "recipe": 4, "cluster": 4, "label": 4, "cli": 5}
# (importing module, enclosing function, imported group) pairs allowed to point upward.
ALLOWED_UPWARD = {("rlhf.orchestrator.config", "check_consistency", "tasks")}


@dataclass(frozen=True)
class Edge:
    src: str             # importing module, e.g. rlhf.orchestrator.recipe.sft
    dst: str             # imported module of the package
    line: int
    function: str | None  # enclosing function of a lazy import; None at module level

    def __str__(self) -> str:
        where = f" (in {self.function})" if self.function else ""
        return f"{self.src}:{self.line}{where} -> {self.dst}"


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the three packages."""
    out = {}
    for prefix, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((prefix, *parts))] = path
    return out


def group_of(module: str) -> str:
    """orchestrator/<pkg>/... -> pkg; orchestrator/<name>.py -> name; actors/*, kernels/* -> actors, kernels."""
    parts = module.split(".")
    if parts[1] in ("actors", "kernels"):
        return parts[1]
    return parts[2] if len(parts) > 2 else "orchestrator"  # rlhf.orchestrator itself (its __init__)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """Package modules an import statement loads (outside modules are dropped)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself.
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    out = []
    for name in names:
        while name and name not in known:  # `import a.b.c` of a non-module attribute path
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def import_edges(files: dict[str, Path]) -> list[Edge]:
    known, edges = set(files), []
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"

        def visit(node: ast.AST, function: str | None) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for dst in _targets(child, module, is_package, known):
                        if dst != module:
                            edges.append(Edge(module, dst, child.lineno, function))
                inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
                visit(child, inner)

        visit(tree, None)
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of a directed graph, or None (iterative DFS, sorted for a stable report)."""
    state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done
    for start in sorted(graph):
        if start in state:
            continue
        stack, path = [(start, iter(sorted(graph.get(start, ()))))], [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = 1
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
    return None


def upward_edges(edges: list[Edge], rank: dict[str, int], allowed: set[tuple]) -> list[Edge]:
    """Edges from a group to a group of higher rank, minus the allowed exceptions."""
    return [e for e in edges
            if rank[group_of(e.dst)] > rank[group_of(e.src)]
            and (e.src, e.function, group_of(e.dst)) not in allowed]


def module_graph(edges: list[Edge]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.src, set()).add(e.dst)
    return graph


def group_graph(edges: list[Edge], allowed: set[tuple]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for e in edges:
        a, b = group_of(e.src), group_of(e.dst)
        if a != b and (e.src, e.function, b) not in allowed:
            graph.setdefault(a, set()).add(b)
    return graph


# ---- the real package ----------------------------------------------------------------

FILES = module_files()
EDGES = import_edges(FILES)


def test_the_parser_sees_the_package():
    # A broken walk (wrong root, missed lazy imports) would make every check below vacuous.
    assert {"rlhf.orchestrator.config", "rlhf.actors.learner", "rlhf.kernels.logprobs"} <= set(FILES)
    assert set(map(group_of, FILES)) <= set(RANK), sorted(set(map(group_of, FILES)) - set(RANK))
    lazy = [e for e in EDGES if e.function]
    assert len(EDGES) > 100 and lazy, (len(EDGES), len(lazy))
    assert any(e.src == "rlhf.kernels.logprobs_triton" and e.dst == "rlhf.kernels._common" for e in EDGES)


def test_no_import_cycle_among_modules():
    cycle = find_cycle(module_graph(EDGES))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_group_imports_a_higher_group():
    bad = upward_edges(EDGES, RANK, ALLOWED_UPWARD)
    assert not bad, "imports against the layer order:\n" + "\n".join(
        f"  {e}  ({group_of(e.src)} -> {group_of(e.dst)})" for e in bad)


def test_groups_of_equal_rank_import_each_other_acyclically():
    cycle = find_cycle(group_graph(EDGES, ALLOWED_UPWARD))
    assert cycle is None, "group cycle: " + " -> ".join(cycle) + "\n" + "\n".join(
        f"  {e}" for e in EDGES
        if (group_of(e.src), group_of(e.dst)) in set(zip(cycle, cycle[1:])))


def test_actors_import_only_the_lower_layers():
    # Worker code lives in actors/; it never reaches into the drivers above it.
    for e in EDGES:
        if group_of(e.src) == "actors":
            assert group_of(e.dst) in {"orchestrator", "errors", "config", "experience", "rl", "tasks", "data",
                                       "run", "models", "kernels", "evidence", "actors"}, str(e)


# ---- control: the checks must catch what they are for -----------------------------------

def test_control_planted_cycle_and_upward_edge_are_caught():
    mod = lambda group, name: f"rlhf.orchestrator.{group}.{name}"  # noqa: E731
    planted = [
        Edge(mod("rl", "a"), mod("rl", "b"), 1, None),
        Edge(mod("rl", "b"), mod("rl", "c"), 2, "lazy"),
        Edge(mod("rl", "c"), mod("rl", "a"), 3, None),       # a -> b -> c -> a
        Edge(mod("rl", "c"), mod("ppo", "x"), 4, "helper"),  # rl (1) -> ppo (3): upward
        Edge(mod("ppo", "x"), mod("rl", "d"), 5, None),      # downward: fine
        Edge("rlhf.orchestrator.config", mod("tasks", "r"), 6, "check_consistency"),  # the allowed one
        Edge("rlhf.orchestrator.config", mod("tasks", "r"), 7, None),  # same, at module level: not allowed
        Edge(mod("tasks", "t"), mod("data", "d"), 8, None),
        Edge(mod("data", "d"), mod("tasks", "u"), 9, None),  # equal rank, but a group cycle
    ]
    assert find_cycle(module_graph(planted)) == [mod("rl", "a"), mod("rl", "b"), mod("rl", "c"), mod("rl", "a")]
    assert [e.line for e in upward_edges(planted, RANK, ALLOWED_UPWARD)] == [4, 7]
    assert find_cycle(group_graph(planted, ALLOWED_UPWARD)) in (["data", "tasks", "data"], ["tasks", "data", "tasks"])
    acyclic = [e for e in planted if e.line not in (3, 9)]
    assert find_cycle(module_graph(acyclic)) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_control_relative_imports_resolve():
    known = {"rlhf.kernels", "rlhf.kernels._common", "rlhf.kernels.logprobs", "rlhf.orchestrator.ppo",
             "rlhf.orchestrator.ppo.groups", "rlhf.orchestrator.rl"}
    parse = lambda src: ast.parse(src).body[0]  # noqa: E731
    assert _targets(parse("from ._common import _mm_fp32"), "rlhf.kernels.logprobs", False, known) \
        == ["rlhf.kernels._common"]
    assert _targets(parse("from .logprobs import token_logprobs"), "rlhf.kernels", True, known) \
        == ["rlhf.kernels.logprobs"]
    assert _targets(parse("from ..rl import losses"), "rlhf.orchestrator.ppo.groups", False, known) \
        == ["rlhf.orchestrator.rl"]
    assert _targets(parse("import torch, rlhf.orchestrator.ppo.groups"), "x", False, known) \
        == ["rlhf.orchestrator.ppo.groups"]
