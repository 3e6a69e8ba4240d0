"""The package's layering, read from the source: no import cycles (function-level imports included), model code
imports no data, training or run code, and data code imports no model or converter code."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "meteor_jax"


def _module(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the meteor_jax modules it imports anywhere in its source}."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("meteor_jax"):
                # `from meteor_jax.train import step` imports the module meteor_jax.train.step
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("meteor_jax")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_layers():
    graph = import_graph()
    forbidden = {
        "meteor_jax.models": ("meteor_jax.data", "meteor_jax.train", "meteor_jax.run", "meteor_jax.inference",
                              "meteor_jax.convert", "meteor_jax.eval"),
        "meteor_jax.data": ("meteor_jax.models", "meteor_jax.convert", "meteor_jax.train", "meteor_jax.run"),
    }
    bad = [(m, d) for m, deps in graph.items() for layer, banned in forbidden.items() if m.startswith(layer + ".")
           for d in deps if d.startswith(banned)]
    assert bad == []
