"""The scheduler's modules import one another only downward (docs/architecture.md, "Import
direction"): the step loop over the running requests' share of a step, over admission and
preemption, over forking, over the state, over the KV cache manager and policies, over plain
data. No cycle, and no part imports scheduler.py."""

import ast
from pathlib import Path

import pagedserve.scheduler

PACKAGE = Path(pagedserve.scheduler.__file__).parent
LAYERS = [
    {"scheduler"},
    {"running"},
    {"admission", "preemption"},
    {"forking"},
    {"state"},
    {"kv_cache_manager", "policies"},
    {"block_pool", "request", "output", "config"},
]
LAYER_OF = {module: depth for depth, layer in enumerate(LAYERS) for module in layer}


def scheduler_imports(path: Path) -> set[str]:
    """Modules of pagedserve.scheduler that the file imports (at any depth of the file)."""
    prefix = "pagedserve.scheduler."
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "pagedserve.scheduler":
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(prefix):
            modules.add(node.module.removeprefix(prefix))
        elif isinstance(node, ast.Import):
            modules.update(alias.name.removeprefix(prefix) for alias in node.names
                           if alias.name.startswith(prefix))
    return modules


def test_every_module_has_a_layer():
    modules = {path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    assert modules == set(LAYER_OF)


def test_imports_only_point_down():
    upward = [(path.stem, imported) for path in PACKAGE.glob("*.py") if path.stem in LAYER_OF
              for imported in scheduler_imports(path)
              if LAYER_OF[imported] <= LAYER_OF[path.stem]]
    assert upward == []
