"""The package's import graph: layers point one way and no module imports itself back through others.

Read from the source with `ast` (every import, also the ones inside functions), so a lazy import that would
hide a circle at run time counts as well.
"""

import ast
import pathlib

import vlm_jax

ROOT = pathlib.Path(vlm_jax.__file__).parent

# The subpackages each subpackage may import ('' = the top-level modules: errors, config_utils). Everything not
# listed is refused: the runtime floor, models and data never import methods/, train/ or programs/; data never
# imports convert/ (checkpoint location is the runtime floor's); models never import convert/ or data/
ALLOWED = {
    "": {""},
    "runtime": {"", "runtime"},
    "models": {"", "runtime", "models"},
    "convert": {"", "runtime", "models", "data", "convert"},  # data: a loader also brings tokenizer + processor
    "data": {"", "runtime", "data"},
    "eval": {"", "runtime", "models", "data", "eval"},
    "methods": {"", "runtime", "models", "data", "eval", "methods"},
    "train": {"", "runtime", "train"},
    "testing": {"", "runtime", "models", "convert", "data", "testing"},
    "programs": {"", "runtime", "models", "convert", "data", "eval", "methods", "train", "testing", "programs"},
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("vlm_jax",) + path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(modules) -> dict[str, set[str]]:
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlm_jax"):
                for alias in node.names:  # `from vlm_jax.data import chat` imports the module vlm_jax.data.chat
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("vlm_jax"))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (ROOT / parts[1]).is_dir()) else ""


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(root):
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1; stack.append(w); on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop(); on.discard(w); comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = _imports(_modules())
    assert len(graph) > 40 and sum(map(len, graph.values())) > 100  # the parser sees the package
    assert _cycles(graph) == []


def test_layers_point_one_way():
    graph = _imports(_modules())
    assert set(map(_layer, graph)) <= set(ALLOWED), set(map(_layer, graph)) - set(ALLOWED)
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if _layer(d) not in ALLOWED[_layer(m)])
    assert bad == []


def test_functions_are_short():
    # The bar for readable programs: no function (docstring included) of 80 lines or more.
    longest = max(((n.end_lineno - n.lineno + 1, f"{path.name}:{n.name}")
                   for path in _modules().values() for n in ast.walk(ast.parse(path.read_text()))
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), default=(0, ""))
    assert longest[0] < 80, longest
