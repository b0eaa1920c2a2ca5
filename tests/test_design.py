"""The layers of docs/design.md: every import of a toco module (at the top or inside a function) goes to its own
layer or one below, and no modules import each other in a circle."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "toco"

# docs/design.md, bottom to top: a module may import its own layer and those below
LAYERS = [
    ["toco", "toco.errors", "toco.config", "toco.runtime", "toco.files", "toco.metrics", "toco.viz", "toco.report"],
    ["toco.kernels", "toco.filters", "toco.crf", "toco.data", "toco.models", "toco.par", "toco.pseudo",
     "toco.losses", "toco.checkpoint"],
    ["toco.evaluation"],
    ["toco.engine"],
    ["toco.tracking", "toco.distributed.cluster", "toco.distributed.train", "toco.distributed.evaluate"],
    ["toco.run"],
    ["toco.sweep", "toco.ablation"],
    ["toco.cli", "toco.__main__"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of the longest prefix listed (toco.data.synthetic -> toco.data)."""
    best = max((entry for layer in LAYERS for entry in layer if module == entry or module.startswith(entry + ".")),
               key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer of docs/design.md")
    return next(i for i, layer in enumerate(LAYERS) if best in layer)


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("toco")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("toco") and node.level == 0:
            found.add(node.module)
    return found


MODULES = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers_or_stay_in_theirs(module):
    for target in MODULES[module]:
        if target in MODULES or any(m.startswith(target + ".") for m in MODULES):
            assert layer_of(target) <= layer_of(module), f"{module} (layer {layer_of(module)}) imports {target} " \
                                                         f"(layer {layer_of(target)})"


def test_no_modules_import_each_other_in_a_circle():
    """Package __init__ files re-export their modules, so an import of a package counts as one of each of its
    modules that the __init__ imports."""
    def resolve(target: str) -> set[str]:
        return {target} if target in MODULES else set()

    graph = {m: {t for target in targets for t in resolve(target) if t != m} for m, targets in MODULES.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                circle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)
