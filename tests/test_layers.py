"""Dependencies inside devec_core point one way (docs/ARCHITECTURE.md), read from the source by
docs/import_graph.py: no import cycle, the math at the bottom imports no sibling, the file
readers know nothing of caches, exports or the app."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("import_graph", Path(__file__).resolve().parent.parent / "docs" / "import_graph.py")
G = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(G)


def test_cycle_finder_sees_a_cycle_and_ignores_lazy_edges():
    g = {"a": {"b": "module"}, "b": {"c": "module"}, "c": {"a": "module"}, "d": {"a": "lazy"}}
    assert G.cycles(g) == [["a", "b", "c"]]
    assert G.cycles({"a": {"b": "module"}, "b": {"a": "lazy"}}) == []
    assert G.layers({"a": {"b": "module"}, "b": {}, "c": {"a": "module", "b": "lazy"}}) == {"a": 1, "b": 0, "c": 2}


def test_no_import_cycle_between_modules():
    assert G.cycles(G.graph(unit_level=False)) == []


@pytest.mark.parametrize("unit", ["algorithm", "taskvec", "paths"])
def test_the_bottom_layer_imports_no_sibling(unit):
    assert G.graph()[unit] == {}


def test_formats_reads_files_into_task_vectors_and_nothing_more():
    assert set(G.graph()["formats"]) <= {"taskvec", "paths"}


# the units of the file/CLI/merge side: every sibling import visible at the top of the file
VISIBLE = ("formats", "cli", "export", "merge", "presets", "plots", "chance", "models", "taskvec", "paths", "__main__")


@pytest.mark.parametrize("unit", VISIBLE)
def test_sibling_imports_are_at_module_level(unit):
    lazy = [m for m, kind in G.graph()[unit].items() if kind == "lazy"]
    assert lazy == [], f"{unit} imports {lazy} inside functions"
