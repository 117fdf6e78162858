"""The layers of the tree, checked from the source: no import circles, no import from a lower layer
to a higher one (engine/ never imports jobs/, bench/ or launch/; engine/runner and engine/model
never import the loop)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "jobs", "bench", "launch", "hydra_plugins", "lm_eval_batchgen")

LAYERS: list[tuple[str, int]] = [
    # (module, or package ending in ".*" for everything below it; the most specific entry wins), rank
    ("engine.config", 0),
    ("engine.outputs", 0),
    ("engine.sampling_params", 0),
    ("engine.timing", 0),
    ("engine.model.*", 1),
    ("engine.runner.*", 2),
    ("engine.worker", 3),
    ("engine.parallel.*", 4),
    ("engine.top_logprobs", 5),
    ("engine.guided.*", 4),  # constrained decoding: grammars and matchers, below the loop that drives them
    ("engine.*", 5),  # the loop: llm_engine, scheduler, block_manager, sequence, ...
    ("engine.build", 6),
    ("engine.llm", 7),
    ("engine", 8),
    ("jobs.errors", 10),
    ("jobs.config", 10),
    ("jobs.tiny_model", 10),
    ("jobs.pipeline.*", 11),
    ("jobs.reporting.*", 12),
    ("bench.*", 13),
    ("bench.scripts.*", 16),
    ("launch.*", 14),
    ("jobs.*", 15),  # the job entry points
    ("run", 16),
    ("hydra_plugins.*", 16),
    ("lm_eval_batchgen.*", 16),  # the lm-evaluation-harness model: over the engine only
]
"""A module may import only modules of its own rank or lower."""


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``packages`` under ``root`` (and top-level scripts)."""
    out = {}
    for pkg in packages:
        for path in (root / pkg).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    for path in root.glob("*.py"):
        out[path.stem] = path
    return out


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The project modules that ``name`` imports anywhere in its source (function bodies and
    TYPE_CHECKING blocks included: a lazy import still makes a circle)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a package: the longest known prefix
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def rank(module: str, layers: list[tuple[str, int]]) -> int:
    best, best_len = None, -1
    for key, value in layers:
        if key.endswith(".*"):
            prefix = key[:-1]
            hit = module.startswith(prefix) and len(prefix) > best_len
            length = len(prefix)
        else:
            hit = module == key
            length = len(key) + 1000  # an exact entry beats any package entry
        if hit and length > best_len:
            best, best_len = value, length
    if best is None:
        raise AssertionError(f"{module} has no layer: add it to LAYERS")
    return best


def check_tree(root: Path, packages: tuple[str, ...], layers: list[tuple[str, int]]) -> list[str]:
    """Problems found: upward imports and import circles."""
    files = module_files(root, packages)
    graph = {m: imports_of(m, p, set(files)) for m, p in files.items()}
    problems = [
        f"{m} (layer {rank(m, layers)}) imports {t} (layer {rank(t, layers)})"
        for m, targets in sorted(graph.items())
        for t in sorted(targets)
        if rank(t, layers) > rank(m, layers)
    ]
    problems += [f"import circle: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component) + [min(component)])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_tree_has_no_circles_and_no_upward_imports():
    assert check_tree(ROOT, PACKAGES, LAYERS) == []


def _plant(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    "planted, expected",
    [
        (
            {"engine/runner/x.py": "def f():\n    from engine.llm_engine import LLMEngine\n"},
            "engine.runner.x (layer 2) imports engine.llm_engine (layer 5)",
        ),
        ({"engine/model/y.py": "from jobs.pipeline import writer\n"}, "engine.model.y (layer 1) imports"),
        (
            {
                "jobs/pipeline/a.py": "from jobs.pipeline.b import X\n",
                "jobs/pipeline/b.py": "from . import a\n",
            },
            "import circle: jobs.pipeline.a -> jobs.pipeline.b -> jobs.pipeline.a",
        ),
    ],
)
def test_the_check_catches_a_planted_fault(tmp_path, planted, expected):
    tree = {
        "engine/__init__.py": "",
        "engine/llm_engine.py": "",
        "engine/runner/__init__.py": "",
        "engine/model/__init__.py": "",
        "jobs/__init__.py": "",
        "jobs/pipeline/__init__.py": "",
        "jobs/pipeline/writer.py": "",
    }
    _plant(tmp_path, tree)
    assert check_tree(tmp_path, ("engine", "jobs"), LAYERS) == []
    _plant(tmp_path, planted)
    problems = check_tree(tmp_path, ("engine", "jobs"), LAYERS)
    assert any(p.startswith(expected) for p in problems), problems
