"""The layout's rules, read from the code itself: ``mm_rec/`` is exactly what a checkpoint carries;
the model imports nothing of the main job or the research harness, nor their dependencies; the
arrows between the folders point one way and no package has an import cycle."""

import ast
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
MODEL_LIBRARIES = {"torch", "transformers", "safetensors", "huggingface_hub", "triton"}


def imports(path: Path):
    """(absolute top-level names, relative module names) imported anywhere in the file."""
    absolute, relative = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            absolute.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                relative.update([node.module] if node.module else [alias.name for alias in node.names])
            else:
                absolute.add(node.module.split(".")[0])
    return absolute, relative


def modules(folder: str):
    return sorted((REPOSITORY / folder).glob("*.py"))


def test_a_checkpoint_carries_every_model_module_and_nothing_else(tiny_checkpoint):
    carried = {p.name for p in tiny_checkpoint.glob("*.py")}
    assert carried == {p.name for p in modules("mm_rec")} - {"__init__.py"}


def test_the_model_imports_only_itself_its_libraries_and_the_standard_library():
    for path in modules("mm_rec"):
        absolute, _ = imports(path)
        outside = {name for name in absolute if name not in sys.stdlib_module_names and name not in MODEL_LIBRARIES}
        assert not outside, f"{path.name} imports {sorted(outside)}"


@pytest.mark.parametrize("folder, allowed", [("mm_rec_train", {"mm_rec"}), ("scripts", {"mm_rec", "mm_rec_train"}),
                                             ("research", {"mm_rec", "mm_rec_train"})])
def test_arrows_point_from_the_tools_to_the_model_never_back(folder, allowed):
    ours = {"mm_rec", "mm_rec_train", "research", "scripts"}
    for path in modules(folder):
        absolute, _ = imports(path)
        assert absolute & ours <= allowed, f"{folder}/{path.name} imports {sorted(absolute & ours - allowed)}"


@pytest.mark.parametrize("package", ["mm_rec", "mm_rec_train"])
def test_no_import_cycle_inside_a_package(package):
    graph = {p.stem: imports(p)[1] for p in modules(package)}
    absolute_own = {p.stem: imports(p)[0] for p in modules(package)}
    assert all(package not in names for names in absolute_own.values()), "a package imports itself by name"
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", f"import cycle: {' -> '.join(trail + [name])}"
        state[name] = "open"
        for child in graph.get(name, ()):
            visit(child, trail + [name])
        state[name] = "done"

    for name in graph:
        visit(name, [])
