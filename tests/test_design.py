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


MAX_MODULE_LINES = 550  # docs/design.md: a module that outgrows this is split by what it does


def test_no_module_outgrows_its_size():
    sizes = {module: len(path.read_text().splitlines()) for module, path in
             ((module_name(p), p) for p in PACKAGE.rglob("*.py"))}
    assert {m: n for m, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_the_package_list_names_every_package_and_the_kernel_sources():
    """pyproject.toml lists the packages (setuptools cannot find csrc/, the kernels it maps to toco.csrc)."""
    import tomllib

    setuptools = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")}
    assert set(setuptools["packages"]) == packages | {"toco.csrc"}
    assert setuptools["package-dir"] == {"toco.csrc": "csrc"}


def test_an_installed_wheel_ships_the_kernel_sources_and_shares_the_checkouts_build(tmp_path):
    """A non-editable install compiles the same sources into the same build folder as the checkout: one build per
    machine, whichever copy of toco (a checkout, a wheel, a Ray job's working dir) asks first."""
    import os
    import shutil
    import subprocess
    import sys
    import zipfile

    import toco.kernels

    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PACKAGE.parent / name, tree / name)
    for name in ("toco", "csrc"):
        shutil.copytree(PACKAGE.parent / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(tree)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("toco-*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    sources = sorted(p.name for p in toco.kernels.CSRC.iterdir() if p.suffix in (".cpp", ".cu", ".h"))
    assert sorted(p.name for p in (tmp_path / "site" / "toco" / "csrc").iterdir()) == sources
    probe = ("import toco.kernels as k; print(k.CSRC); "
             "print(k._staged('toco_cpu', [k.CSRC / 'permutohedral_cpu.cpp'])[0])")
    installed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                               cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    csrc, build = installed.stdout.split()
    assert Path(csrc) == tmp_path / "site" / "toco" / "csrc"
    assert Path(build) == toco.kernels._staged("toco_cpu", [toco.kernels.CSRC / "permutohedral_cpu.cpp"])[0]
