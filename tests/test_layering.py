"""Module layering: the kernels are leaves (torch, numpy, triton only), and no production module imports
the test-only package (oracle, harness, fills) at module level."""

import ast
from pathlib import Path

import hybrid_kv

PKG = Path(hybrid_kv.__file__).parent
KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def _top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in tree.body:  # module level only: imports inside functions are the lazy, on-request ones
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_kernels_are_leaves():
    for path in KERNELS.glob("*.py"):
        mods = _top_level_imports(path)
        allowed = {"__future__", "dataclasses", "numpy", "torch", "triton"}
        bad = {m for m in mods if m.split(".")[0] not in allowed and not m.startswith("hybrid_kv.kernels")}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_production_modules_do_not_import_the_testing_package():
    checked = 0
    for path in PKG.rglob("*.py"):
        if "testing" in path.relative_to(PKG).parts:
            continue
        mods = _top_level_imports(path)
        assert not {m for m in mods if m.startswith("hybrid_kv.testing")}, path
        checked += 1
    assert checked > 30  # the walk found the package
