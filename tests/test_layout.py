"""The package's layers (README, "How it fits together"): the training core imports none
of the optional commands and integrations, and no module imports itself back through others."""

import ast

from mnist_cnn import ROOT

PACKAGE = ROOT / "mnist_cnn"
# what a researcher reads and what a training run needs; everything else stands on top of it
CORE = {"__init__", "errors", "files", "model", "module", "data", "mnist_files", "callbacks"}
CORE |= {"checkpoint", "runinfo", "validate", "train"}


def imports() -> dict[str, set[str]]:
    """Each module's ``mnist_cnn`` imports, at the top and inside functions."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "mnist_cnn":
                found |= {a.name for a in node.names if (PACKAGE / f"{a.name}.py").is_file()}
                found.add("__init__")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mnist_cnn."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("mnist_cnn.")]
                found |= {name.split(".")[1] for name in names}
        graph[path.stem] = found - {path.stem}
    return graph


def test_the_core_never_imports_an_optional_command_or_integration():
    graph = imports()
    assert graph.keys() >= CORE and len(graph) > len(CORE)  # the names above are real modules
    wrong = {m: sorted(graph[m] - CORE) for m in CORE if graph[m] - CORE}
    assert wrong == {}


def test_no_module_imports_itself_back():
    graph = imports()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    assert [m for m in graph if reaches(m, m, {m})] == []
    assert imports()["validate"] >= {"errors", "runinfo"}  # the walk sees function-level imports
