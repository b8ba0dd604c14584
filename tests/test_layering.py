"""Module layering: the kernels are leaves (torch, numpy, triton only); the core (`staging`, and above it the
state mover `mover`) imports neither shell, nor vLLM, and the shells (`transport`: the CLI rank processes;
`vllm`: the connector) not each other, lazily or not; no module-level import cycle; the oracle is independent
of the data path (it imports none of it) and nothing that runs inside a serving engine imports it; every
package is listed in pyproject.toml, so that a wheel holds it."""

import ast
from pathlib import Path

import pytest

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


def _all_imports(path: Path) -> set[str]:
    """Every hybrid_kv module `path` imports, at module level or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return {m for m in out if m.startswith("hybrid_kv")}


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


@pytest.mark.parametrize(
    "part,forbidden",
    [
        ("staging", {"mover", "transport", "vllm", "oracle", "harness"}),
        ("mover", {"transport", "vllm", "oracle", "harness"}),
        ("transport", {"vllm"}),
        ("vllm", {"transport", "oracle", "harness"}),
        # the oracle restates vLLM's sharding from the model dims: none of the code it checks
        ("oracle", {"plan", "ops", "kernels", "staging", "mover", "transport", "vllm", "harness", "repack"}),
    ],
)
def test_the_core_and_the_shells_keep_their_folders(part, forbidden):
    files = list((PKG / part).glob("*.py"))
    assert len(files) > 2
    for path in files:
        bad = {m for m in _all_imports(path) if _part(m) in forbidden}
        assert not bad, f"{part}/{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("part", ["staging", "mover"])
def test_the_core_imports_no_engine(part):
    """The core runs without vLLM installed (the CLI transport, the GPU machine): no import of it, lazily
    or not."""
    for path in (PKG / part).glob("*.py"):
        tree = ast.parse(path.read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in mods if m.split(".")[0] == "vllm"}, f"{part}/{path.name} imports vLLM"


def test_every_package_is_in_the_wheel():
    """pyproject.toml lists the packages explicitly: one missing from the list is absent from a wheel (an
    editable install run from the checkout would not notice)."""
    import tomllib

    listed = set(tomllib.loads((PKG.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(("hybrid_kv", *p.parent.relative_to(PKG).parts)) for p in PKG.rglob("__init__.py")}
    assert listed == found | {"hybrid_kv.kernels"}


def _module_level(path: Path) -> set[str]:
    """hybrid_kv modules imported when `path` is imported (not those under `if TYPE_CHECKING:`)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
    return {m for m in out if m.startswith("hybrid_kv")}


def test_no_module_level_import_cycle():
    mods = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        mods[name] = path
    graph = {n: {m for m in _module_level(p) if m in mods and m != n} for n, p in mods.items()}
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(m) :] + [n, m])}")
            if m not in state:
                visit(m, stack + [n])
        state[n] = 2

    for n in sorted(mods):
        if n not in state:
            visit(n, [])
