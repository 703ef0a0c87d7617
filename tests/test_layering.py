"""The package's import structure, read with ``ast`` (no module is imported).

Layers, lowest first; a module may import from its own layer and the ones below, never
from above (a back-arrow: a utility buried in a stage, a model reaching into a stage):

- core: confs, files, images, devices, checkpoints, registries, formats of the stores
  and top-k files, geodesy;
- models: global descriptors, local features, matchers, scorers;
- stores: local feature and match stores (named by model confs), the config check;
- stages: dataset indexing, extraction, index and search, matching and scoring,
  evaluation, the night query set;
- reports;
- cli: the command line.

And no two packages import each other (directly or round a loop).
"""

import ast
from pathlib import Path

import pytest

from .conftest import REPO

PKG = REPO / "pipeline"
LAYERS = {  # module or package prefix -> layer
    "core": ["datasets", "args", "conf", "download", "assets", "conf_checks", "io", "images", "loader", "gpus", "geodesy", "checkpoints", "registry",
             "redact", "global_store", "topk", "index_plan", "datasets.names", "datasets.geo", "pycls_resnet"],
    "models": ["global_features", "local_features", "matchers", "scorers"],
    "stores": ["local_store", "match_store", "config"],
    "stages": ["datasets.index", "datasets.synthetic", "extract_global", "gather", "retrieval", "extract_local",
               "rerank", "evaluate", "gate_probe", "uncertainty", "random_weights", "weights", "published", "nightset"],
    "reports": ["reports"],
    "cli": ["cli", "__main__"],
}
ORDER = list(LAYERS)


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, module: str | None = None) -> set[str]:
    """Modules of the package that ``path`` (the module ``module``, by default from its
    place in the package) imports, relative to ``pipeline``, anywhere in it."""
    module = module_name(path) if module is None else module
    mod = module.split(".") if module else []
    package = mod if path.name == "__init__.py" else mod[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and (node.module == "pipeline" or node.module.startswith("pipeline.")):
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from . import x` / `from .pkg import module`
                sub = ".".join(target + [alias.name])
                out.add(sub if (PKG / Path(*target, alias.name)).with_suffix(".py").exists()
                        or (PKG / Path(*target, alias.name)).is_dir() else ".".join(target))
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("pipeline.")}
    return {m for m in out if m}


def layer(module: str) -> str:
    best = max((p for ps in LAYERS.values() for p in ps if module == p or module.startswith(p + ".")),
               key=len, default=None)
    if best is None:
        raise AssertionError(f"pipeline.{module} is in no layer: add it to LAYERS in {__file__}")
    return next(name for name, ps in LAYERS.items() if best in ps)


def package_of(module: str) -> str:
    """The unit cycles are checked between: a sub-package, or a top-level module."""
    return module.split(".")[0]


GRAPH = {module_name(p): imports(p) for p in sorted(PKG.rglob("*.py"))}


def test_every_module_has_a_layer():
    for module in GRAPH:
        if module:
            layer(module)


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m))
def test_no_import_from_a_higher_layer(module):
    mine = ORDER.index(layer(module))
    up = sorted(f"pipeline.{t} ({layer(t)})" for t in GRAPH[module] if ORDER.index(layer(t)) > mine)
    assert not up, f"pipeline.{module} ({layer(module)}) imports from a higher layer: {up}"


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    seen, on_path, cycles = set(), [], []

    def visit(node):
        if node in on_path:
            cycles.append(on_path[on_path.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        on_path.append(node)
        for nxt in sorted(edges.get(node, ())):
            visit(nxt)
        on_path.pop()

    for node in sorted(edges):
        visit(node)
    return cycles


def test_no_package_cycle():
    edges: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        if module:
            src = package_of(module)
            edges.setdefault(src, set()).update(package_of(t) for t in targets if package_of(t) != src)
    cycles = find_cycles(edges)
    assert not cycles, "package cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_back_arrow_and_a_cycle(tmp_path):
    """The checks above can fail: a core module importing a stage, and two packages importing each other."""
    assert ORDER.index(layer("conf")) < ORDER.index(layer("rerank"))
    probe = tmp_path / "probe.py"
    probe.write_text("from ..rerank import match_topk\nfrom ..nightset import classify\nimport pipeline.io\n")
    assert imports(probe, "matchers.probe") == {"rerank", "nightset.classify", "io"}
    assert ORDER.index(layer("rerank")) > ORDER.index(layer("matchers.probe"))
    # global_features.vlad -> local_features and local_features.base -> global_features.base was one
    assert find_cycles({"global_features": {"local_features"}, "local_features": {"global_features"}}) == [
        ["global_features", "local_features", "global_features"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
