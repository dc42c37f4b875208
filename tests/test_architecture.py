"""The shape of the code, held by tests: no module imports in a cycle (function-level and TYPE_CHECKING imports
counted), a lower layer never imports a higher one (the order docs/architecture.md shows), no function is longer
than a screen, and the loop imports nothing of governance."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "smalti"
MAX_LINES = 80

# Lowest first; a module may import its own layer and those below. The same list is docs/architecture.md's.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["smalti", "smalti.errors", "smalti.formats", "smalti.io", "smalti.locks", "smalti.software",
                    "smalti.threads", "smalti.extras", "smalti.determinism"]),
    ("core", ["smalti.core"]),
    ("trust", ["smalti.trust"]),
    ("data, models, algorithms", ["smalti.data", "smalti.models", "smalti.functional", "smalti.algorithms",
                                  "smalti.loggers", "smalti.config", "smalti.build", "smalti.precision", "smalti.optim", "smalti.optimizers",
                                  "smalti.schedule_free", "smalti.sophia",
                                  "smalti.distributed", "smalti.fsdp", "smalti.checkpoint", "smalti.sharded_checkpoint",
                                  "smalti.generation", "smalti.interrupts", "smalti.payload",
                                  "smalti.checkpoint_fields"]),
    ("train", ["smalti.train"]),
    ("governance", ["smalti.governance"]),
    ("assembly", ["smalti.trainer"]),
    ("workflows", ["smalti.workflows", "smalti.evaluation"]),
    ("serve, cli", ["smalti.serve", "smalti.cli", "smalti.__main__"]),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Every smalti module's smalti imports, wherever they are written (a function, an ``if TYPE_CHECKING``)."""
    modules, edges = _modules(), defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target == "smalti" or target.startswith("smalti."):
                    resolved = _resolve(target, modules)
                    if resolved and resolved != name:
                        edges[name].add(resolved)
    return edges


def _layer_of(module: str) -> int:
    best, level = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module == prefix or (prefix != "smalti" and module.startswith(prefix + "."))
            if inside and len(prefix) > best:
                best, level = len(prefix), index
    assert level is not None, f"{module} is in no layer of tests/test_architecture.py"
    return level


def _deprecated_alias(module: str) -> bool:
    """A module kept only so that an old import path still works for one release (it imports the new one)."""
    text = _modules()[module].read_text(encoding="utf-8")
    return "DEPRECATED_ALIAS = True" in text


def test_no_module_imports_in_a_cycle():
    graph, cycles = import_graph(), []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in _modules():
        if module not in index:
            visit(module)
    assert cycles == [], f"import cycles: {cycles}"


def test_every_module_is_in_one_layer():
    for module in _modules():
        _layer_of(module)  # asserts, naming the module


def test_a_lower_layer_never_imports_a_higher_one():
    wrong = []
    for module, imported in import_graph().items():
        if _deprecated_alias(module):
            continue
        for target in imported:
            if target != "smalti" and _layer_of(target) > _layer_of(module):
                wrong.append(f"{module} ({LAYERS[_layer_of(module)][0]}) imports {target} "
                             f"({LAYERS[_layer_of(target)][0]})")
    assert wrong == [], "\n".join(sorted(wrong))


def test_the_docs_show_the_same_layers():
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    shown = re.findall(r"^\| (\d+) \| ([^|]+) \|", text, re.M)
    assert [(int(n), name.strip()) for n, name in shown] == [(i, name) for i, (name, _) in enumerate(LAYERS)]


def test_no_function_is_longer_than_a_screen():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == [], long


def test_the_loop_imports_nothing_of_governance():
    loop = [m for m in import_graph() if m == "smalti.train" or m.startswith("smalti.train.")]
    assert loop, "no smalti.train modules"
    reached = {target for module in loop for target in import_graph()[module]}
    assert not [t for t in reached if t.startswith(("smalti.governance", "smalti.workflows"))], reached


MOVED = {"smalti.governance.keys": "smalti.trust.keys", "smalti.governance.pkcs11": "smalti.trust.pkcs11",
         "smalti.governance.taxonomy": "smalti.trust.taxonomy", "smalti.governance.policy": "smalti.trust.policy",
         "smalti.governance.ledger.merkle": "smalti.trust.merkle", "smalti.governance.ledger.note": "smalti.trust.note",
         "smalti.governance.ledger.entry": "smalti.trust.entry", "smalti.data.batch": "smalti.core.batch",
         "smalti.governance.lineage_deletion": "smalti.workflows.lineage_deletion",
         "smalti.governance.certificate": "smalti.workflows.certificate",
         "smalti.governance.forget_eval": "smalti.workflows.forget_eval",
         "smalti.governance.witness": "smalti.workflows.witness",
         "smalti.governance.provenance": "smalti.workflows.provenance",
         "smalti.governance.ledger.report": "smalti.workflows.report"}


def test_a_moved_module_keeps_its_old_name_for_a_release_and_says_where_it_went():
    import subprocess
    import sys

    script = f"""
import importlib, warnings
moved = {MOVED!r}
for old, new in moved.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alias = importlib.import_module(old)
    assert alias is importlib.import_module(new), old
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), old
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from smalti.governance.deletion import forget, plan_deletion, DeletionError
from smalti.workflows.forget import forget as moved_forget
from smalti.workflows.deletion import plan_deletion as moved_plan
assert forget is moved_forget and plan_deletion is moved_plan
assert any("smalti.workflows.deletion" in str(w.message) for w in caught)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    assert {m for m in _modules() if _deprecated_alias(m)} == set(MOVED) | {"smalti.governance.deletion"}
