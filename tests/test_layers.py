"""No module imports from a layer above its own (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tbps_compress"

# Lowest first. A unit is a top-level module or subpackage of tbps_compress; units of one layer may import each
# other (the core layer's recipes validate against the model and loss registries, data reads recipe types).
LAYERS: list[set[str]] = [
    {"__version__", "errors", "io_utils", "devices", "distributed", "config", "artifacts"},
    {"runtime"},  # the torch-free deployment runtime
    {"recipes", "models", "losses", "data"},
    {"retrieval", "evaluation"},  # evaluation.py: the eval command's wrappers over retrieval.encoders
    {"engine", "export"},
    {"compress", "bench"},
    {"stages", "pipeline", "serve", "cli", "__init__", "__main__"},
]


def _layer(unit: str) -> int:
    for i, units in enumerate(LAYERS):
        if unit in units:
            return i
    raise AssertionError(f"tbps_compress.{unit} is in no layer of tests/test_layers.py; add it to LAYERS")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, unit imported) for every import of another tbps_compress unit in ``path``."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    package = list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not (node.module or "").startswith("tbps_compress."):
                    continue
                target = node.module.split(".")[1:]
            else:
                base = package[:len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                if not target:
                    target = [node.names[0].name]
            out.append((node.lineno, target[0]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tbps_compress."):
                    out.append((node.lineno, alias.name.split(".")[1]))
    return out


def test_no_module_imports_from_a_layer_above_it() -> None:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        unit = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for line, target in _imports(path):
            if target != unit and _layer(target) > _layer(unit):
                bad.append(f"{rel}:{line} ({unit}, layer {_layer(unit)}) imports {target} (layer {_layer(target)})")
    assert not bad, "imports from a higher layer:\n" + "\n".join(bad)
