"""Guards of the layout (docs/ARCHITECTURE.md): the library never imports the repository's scripts, its modules form no
import cycle, library modules never import command modules, and functions stay short enough to read as one idea.

Every check reads the source with ``ast`` (nothing is imported), and counts imports inside functions as well as at
module level; imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "magvit"
SCRIPT_PACKAGES = ("data_prep", "launch")  # the repository's top-level shims
# Command modules: a `main` behind a CLI and nothing the library needs. `magvit.prep.*` are library steps with a CLI
# attached: importable by anyone.
COMMANDS = ("magvit.launch", "magvit.generate", "magvit.evaluate")
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _library_modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(LIBRARY.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _executed_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, at any depth, except those under ``if TYPE_CHECKING:``."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.orelse:
                    visit_stmt(stmt)
                continue
            visit_stmt(child)

    def visit_stmt(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        visit(node)

    visit(tree)
    return found


def _imported_names(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: set[str]) -> list[str]:
    """Absolute names a statement of ``module`` imports: ``from .x import y`` in ``magvit.a`` gives ``magvit.x.y``
    when that is a module, else ``magvit.x``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        base_parts = package[: len(package) - node.level + 1]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    names = []
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        names.append(candidate if candidate in known else base)
    return names


def _import_graph() -> dict[str, set[str]]:
    """``magvit.*`` module -> the ``magvit.*`` modules it imports (module-level and inside functions)."""
    modules = _library_modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = set()
        for node in _executed_imports(tree):
            for target in _imported_names(name, path.name == "__init__.py", node, known):
                # `import magvit.a.b` runs magvit.a.b; the closest known module stands for a name inside one
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan; the graph has ~60 nodes, recursion depth is no concern
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_path_through(component, graph) for component in components]


def _path_through(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    return sorted(component)


def _is_command(module: str) -> bool:
    return any(module == command or module.startswith(command + ".") for command in COMMANDS)


# --------------------------------------------------------------------------------------------------------------
def test_library_never_imports_the_repository_scripts():
    offences = []
    for name, path in _library_modules().items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _executed_imports(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                continue  # relative: inside magvit
            for target in _imported_names(name, path.name == "__init__.py", node, set()):
                if target.split(".")[0] in SCRIPT_PACKAGES:
                    offences.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}")
        for node in ast.walk(tree):  # importlib.import_module("data_prep.x") is an import too
            called = getattr(node.func, "attr", getattr(node.func, "id", "")) if isinstance(node, ast.Call) else ""
            first = node.args[0] if called == "import_module" and node.args else None
            if isinstance(first, ast.Constant) and str(first.value).split(".")[0] in SCRIPT_PACKAGES:
                offences.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {first.value}")
    assert not offences, "the library (magvit/) must not import data_prep/ or launch/:\n" + "\n".join(offences)


def test_graph_reader_resolves_relative_and_function_level_imports():
    """The checks below see what they claim to: relative imports resolve, imports inside functions count."""
    graph = _import_graph()
    assert "magvit.config" in graph["magvit.tokenizer"]  # from .config import Config
    assert "magvit.distributed" in graph["magvit.quantizers"]  # from .distributed import ...
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    tree = ast.parse("def f():\n    from .masking import x\nif TYPE_CHECKING:\n    from . import cli\n")
    names = [n for node in _executed_imports(tree) for n in _imported_names("magvit.a", False, node, {"magvit.cli"})]
    assert names == ["magvit.masking"]


def test_no_import_cycle_among_library_modules():
    cycles = _cycles(_import_graph())
    assert not cycles, "import cycles among magvit modules (module- or function-level imports):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles)


def test_library_modules_never_import_command_modules():
    offences = [f"{module} imports {target}" for module, targets in sorted(_import_graph().items())
                if not _is_command(module) for target in sorted(targets) if _is_command(target)]
    assert not offences, f"library modules must not import the commands {COMMANDS}:\n" + "\n".join(offences)


@pytest.mark.parametrize("folder", ["magvit", "launch", "data_prep"])
def test_functions_read_as_one_idea(folder):
    too_long = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps):\n" + "\n".join(
        too_long)


# The networks map tokens to logits: they need the vocabulary and layout (magvit.sequence), never the masking.
NETWORKS = ("magvit.transformer", "magvit.autoregressive")
FORBIDDEN_FOR_NETWORKS = ("magvit.masking",)


def network_offences(graph: dict[str, set[str]]) -> list[str]:
    return [f"{network} imports {target}" for network in NETWORKS for target in sorted(graph.get(network, ()))
            if target in FORBIDDEN_FOR_NETWORKS]


def test_the_networks_never_import_the_masking():
    offences = network_offences(_import_graph())
    assert not offences, "transformer.py / autoregressive.py map tokens to logits, nothing more:\n" + "\n".join(
        offences)
    # the check sees an offence where there is one (module- or function-level)
    assert network_offences({"magvit.transformer": {"magvit.masking", "magvit.sequence"}}) == [
        "magvit.transformer imports magvit.masking"]


def test_a_shard_meta_json_is_parsed_in_one_place():
    """``magvit/shard_meta.py`` is the one reader of a shard folder's meta.json: nowhere else in the library (or
    its commands) is a ``json.load`` near a ``meta.json``."""
    offences = []
    for path in sorted(LIBRARY.rglob("*.py")):
        if path.name == "shard_meta.py":
            continue
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            window = " ".join(lines[max(0, number - 4):number + 1])
            if ("json.load(" in line or "json.loads(" in line) and ("meta.json" in window or "meta_path" in window
                                                                      or "META_NAME" in window):
                offences.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offences, "meta.json parsed outside magvit/shard_meta.py:\n" + "\n".join(offences)


def unexplained_function_imports(source: str) -> list[int]:
    """Lines of project imports (``from .x``, ``from magvit.x``, ``import magvit.x``) inside functions that carry no
    comment on their line or the line above: an import belongs at module top unless a cycle or a heavy dependency
    keeps it inside, and then it says which."""
    lines = source.splitlines()
    found = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            project = (isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("magvit"))
                       or isinstance(node, ast.Import) and any(a.name.startswith("magvit") for a in node.names))
            if project and "#" not in lines[node.lineno - 1] and not lines[node.lineno - 2].strip().startswith("#"):
                found.append(node.lineno)
    return sorted(set(found))


def test_function_level_project_imports_say_why():
    offences = [f"{path.relative_to(ROOT)}:{line}" for path in sorted(LIBRARY.rglob("*.py"))
                for line in unexplained_function_imports(path.read_text())]
    assert not offences, ("project imports inside functions without a comment saying why (a cycle, a heavy "
                          "dependency); move them to module top:\n" + "\n".join(offences))
    # the check sees what it claims to
    code = "def f():\n    from .a import b\n    # a cycle: x imports us\n    from .x import y\n    import os\n"
    assert unexplained_function_imports(code) == [2]
