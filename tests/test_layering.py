"""The layering: ediffi_jax is the library, train/ and sample/ are command lines over it.

Read from the source (every import statement, function-local ones included), so a new import
that runs a layer the wrong way fails here before anyone hits the cycle."""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def imported_packages(package: str) -> dict[str, set[str]]:
    """file -> the top-level packages it imports."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = found
    return out


@pytest.mark.parametrize("package, forbidden", [
    ("ediffi_jax", {"train", "sample", "benchmarks", "tests"}),
    ("train", {"sample", "benchmarks", "tests"}),
    ("sample", {"train", "benchmarks", "tests"}),
])
def test_no_layer_imports_upwards_or_sideways(package, forbidden):
    wrong = {f: sorted(found & forbidden) for f, found in imported_packages(package).items()
             if found & forbidden}
    assert not wrong, f"{package} must not import {sorted(forbidden)}: {wrong}"


def test_the_library_imports_its_own_modules_at_module_level():
    """Function-local imports of ediffi_jax modules hide cycles; only a command line's main()
    (which must set XLA flags before jax starts) may import late."""
    late = []
    for path in sorted((ROOT / "ediffi_jax").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name == "main":
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ediffi_jax"):
                    late.append(f"{path.relative_to(ROOT)}:{node.lineno} ({fn.name})")
    assert not late, f"function-local ediffi_jax imports: {late}"


def test_the_network_knows_neither_the_sampler_nor_its_features():
    """models/ gets conv settings, an attention bias and sigma as data; what a sampler, a plan,
    paint-with-words or ScaleCrafter is stays outside it."""
    wrong = []
    for path in sorted((ROOT / "ediffi_jax" / "models").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith((
                    "ediffi_jax.diffusion.plan", "ediffi_jax.diffusion.sampling",
                    "ediffi_jax.paint", "ediffi_jax.highres", "ediffi_jax.pipeline",
                    "ediffi_jax.training", "ediffi_jax.runs")):
                wrong.append(f"{path.relative_to(ROOT)}: {node.module}")
    assert not wrong, wrong
