"""Dependencies point one way: cli -> head/donor/serve/... -> placement/autoscaler -> shared types.

Every import of every module counts, those inside functions too (they once hid loops).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Layer of each top-level part; a module may import only its own layer and those below.
LAYERS = {
    "shared": 0,  # contract, resources, fleet, config, exceptions, processes, reliability, sdk, tls, wire
    "policy": 1,  # placement, autoscaler: pure decisions over shared types
    "mechanism": 2,  # head, donor, serve, train, storage, ...: they apply decisions
    "cli": 3,
}
POLICY = ("dgpt.placement", "autoscaler")
SHARED = ("dgpt.contract", "dgpt.resources", "dgpt.fleet", "dgpt.config", "dgpt.exceptions", "dgpt.processes", "dgpt.datasets",
          "dgpt.reliability", "dgpt.sdk", "dgpt.tls", "dgpt.wire")


def _layer(module: str) -> str:
    if module == "dgpt" or module.startswith(SHARED):
        return "shared"
    if module.startswith(POLICY):
        return "policy"
    if module.startswith("dgpt.cli"):
        return "cli"
    return "mechanism"


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "dgpt" and len(parts) > 1 else parts[0]


def _modules() -> Iterator[tuple[str, Path]]:
    for top in ("dgpt", "autoscaler"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def _imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _edges() -> dict[str, set[str]]:
    ours = {m for m, _ in _modules()}
    edges: dict[str, set[str]] = {}
    for module, path in _modules():
        targets = set()
        for imported in _imports(path):
            if imported in ours:
                targets.add(imported)
            elif imported.split(".")[0] in ("dgpt", "autoscaler", "deployments", "ray"):
                targets.add(imported)
        edges[module] = targets
    return edges


def test_every_import_points_down_or_sideways() -> None:
    upward = []
    for module, targets in _edges().items():
        for target in targets:
            if target.split(".")[0] not in ("dgpt", "autoscaler"):
                continue
            if LAYERS[_layer(target)] > LAYERS[_layer(module)]:
                upward.append(f"{module} ({_layer(module)}) imports {target} ({_layer(target)})")
    assert not upward, "imports against the direction:\n" + "\n".join(sorted(upward))


def test_packages_do_not_import_each_other_in_a_loop() -> None:
    graph: dict[str, set[str]] = {}
    for module, targets in _edges().items():
        for target in targets:
            a, b = _package(module), _package(target)
            if a != b and b.split(".")[0] in ("dgpt", "autoscaler"):
                graph.setdefault(a, set()).add(b)

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return [*path, nxt]
                if nxt not in path:
                    stack.append((nxt, [*path, nxt]))
        return None

    loops = [c for p in graph if (c := cycle_from(p))]
    assert not loops, "package import loops: " + "; ".join(" -> ".join(c) for c in loops)


def test_the_autoscaler_imports_neither_ray_nor_the_head() -> None:
    bad = [f"{m} imports {t}" for m, ts in _edges().items() if m.startswith("autoscaler")
           for t in ts if t.split(".")[0] == "ray" or t.startswith("dgpt.head")]
    assert not bad, bad


def test_dgpt_never_imports_deployments() -> None:
    bad = [f"{m} imports {t}" for m, ts in _edges().items() if m.startswith("dgpt")
           for t in ts if t.split(".")[0] == "deployments"]
    assert not bad, bad


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from dgpt.head.registry import Registry\n")
    assert "dgpt.head.registry" in set(_imports(source))
