"""The package layout of docs/ARCHITECTURE.md, checked against the code
(issue 10): imports point one way down the pipeline, no module imports
another's private name, no module is over 600 lines and the callback class
stays under 450."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "camanim"
ARCH = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"

# the stages of the drawing, top (imported by everything) to bottom
LAYERS = ["errors", "core", "methods", "engine", "metrics", "viz", "runs", "viewer", "lightning",
          "cli"]


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        rel = p.relative_to(SRC).with_suffix("")
        parts = [x for x in rel.parts if x != "__init__"]
        out[".".join(["camanim", *parts])] = p
    return out


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None                      # the package itself: the public API, above all
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def _imports(module: str, path: Path):
    tree = ast.parse(path.read_text())
    pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("camanim"):
                yield node.lineno, target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("camanim"):
                    yield node.lineno, a.name, []


def test_every_stage_of_the_drawing_exists_and_is_named_in_the_doc():
    text = ARCH.read_text()
    for stage in LAYERS[1:]:
        assert (SRC / stage).is_dir() or (SRC / f"{stage}.py").is_file(), stage
        assert stage in text
    mods = _modules()
    for name in mods:
        leaf = name.split(".")[-1]
        if len(name.split(".")) > 2 and leaf not in (
            "__main__",
            "core",
            "methods",
            "metrics",
            "viz",
            "runs",
            "viewer",
            "lightning",
            "cli",
        ):
            if name.split(".")[1] != "methods":        # methods: one file per method
                assert leaf in text, f"{name} is not in docs/ARCHITECTURE.md"


def test_imports_point_one_way():
    bad = []
    for module, path in _modules().items():
        here = _layer(module)
        if here is None:
            continue
        for line, target, _ in _imports(module, path):
            there = _layer(target)
            if there is not None and there > here:
                bad.append(f"{path.relative_to(SRC)}:{line} imports {target}")
    assert bad == []


def test_no_private_names_across_modules():
    bad = []
    for module, path in _modules().items():
        for line, target, names in _imports(module, path):
            if target == module:
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{path.relative_to(SRC)}:{line} imports {target}.{n}")
    assert bad == []


def test_module_and_class_sizes():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}
    tree = ast.parse((SRC / "lightning" / "callback.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CAManimCallback")
    assert cls.end_lineno - cls.lineno + 1 < 450


@pytest.mark.parametrize("name", ["CAManim", "CAManimCallback", "LayerMaps", "ybroad",
                                  "write_video", "YbRoad", "sanity_check"])
def test_public_api_at_the_top_level(name):
    import camanim

    assert hasattr(camanim, name)
