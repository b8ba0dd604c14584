"""Which vLLM releases the connectors support, checked at start-up.

The connectors subclass vLLM's NIXL connector and workers and use members of them that vLLM does not
promise to keep (the private NIXL worker methods change every release). So each supported release is named
here, and any other is refused at start-up, naming both, unless the operator accepts the risk with
``HYBRID_KV_ALLOW_UNSUPPORTED_VLLM=1`` (then a warning is logged). `check_source` (``python -m
hybrid_kv.vllm.compat SOURCE...``) checks a release's sources against the version surface (`surface.py`).
"""

from __future__ import annotations

import ast
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

SUPPORTED = ("0.32.0",)
ENV_ALLOW = "HYBRID_KV_ALLOW_UNSUPPORTED_VLLM"

log = logging.getLogger("vllm.hybrid_kv")


def release(version: str) -> str:
    """The release a version string names: a local build tag (``+cpu``, ``+cu130``) is not a release."""
    return version.split("+", 1)[0]


def check_vllm_version(version: str | None = None, environ: Mapping[str, str] = os.environ) -> str:
    """The running vLLM's version, if this release is supported (or the operator allowed it); else raises
    naming it and the supported releases."""
    if version is None:
        import vllm

        version = str(vllm.__version__)
    if release(version) in SUPPORTED:
        return version
    allowed = environ.get(ENV_ALLOW, "")
    if allowed == "1":
        log.warning("hybrid-kv: vLLM %s is not a supported release (%s); running anyway (%s=1)",
                    version, ", ".join(SUPPORTED), ENV_ALLOW)  # fmt: skip
        return version
    if allowed not in ("", "0"):
        raise ValueError(f"{ENV_ALLOW}={allowed!r} (accepted: 1 to run an unsupported vLLM, 0 or unset)")
    raise RuntimeError(
        f"hybrid-kv's vLLM connectors support vLLM {', '.join(SUPPORTED)}; this is vLLM {version}, whose NIXL "
        f"worker members the connectors use were not checked. Install a supported release, or set "
        f"{ENV_ALLOW}=1 to run anyway at your own risk"
    )


# ---- the version surface against a release's sources (python -m hybrid_kv.vllm.compat SOURCE...) ----


@dataclass(frozen=True)
class Owner:
    """A vLLM class (or, with `cls` empty, a module) and what the adapter uses of it.

    override: methods the adapter's subclass defines, which vLLM must still call (name -> parameters);
    call: methods the adapter calls (name -> parameters); read: attributes or properties it reads or sets;
    fields: constructor fields or message fields it builds or reads; functions: module-level functions it
    calls or swaps at run time (name -> parameters; a trailing `...`: later parameters with defaults are
    fine, the adapter forwards them); env: environment settings of `vllm.envs` it reads."""

    module: str
    cls: str = ""
    override: Mapping[str, str] = field(default_factory=dict)
    call: Mapping[str, str] = field(default_factory=dict)
    read: str = ""
    fields: str = ""
    functions: Mapping[str, str] = field(default_factory=dict)
    env: str = ""
    since: str = ""  # the first release that has these members (older ones are not checked for them)


# where vLLM calls the connector's hooks: its KV-transfer code, the v1 engine and its config checks
CALLERS = ("vllm.distributed", "vllm.v1", "vllm.config")


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", release(v))[:3])


def _params_problem(S, fn, want: str) -> str | None:
    got = S.params(fn)
    head = want.removesuffix("...").split()
    if want.endswith("...") and got[: len(head)] == tuple(head) and not (S.required(fn) & set(got[len(head) :])):
        return None  # added parameters have defaults, and the adapter forwards them
    if got != tuple(head):
        return f"parameters ({' '.join(got)}) differ from ({want})"
    return None


def _called(S, src, name: str, chain) -> bool:
    """A private hook must be called by the class itself or its vLLM bases (another connector's method of
    the same name does not count); a public one anywhere in CALLERS."""
    if not name.startswith("_"):
        return S.referenced(src, name, CALLERS)
    return any(
        isinstance(n, ast.Attribute) and n.attr == name and isinstance(n.ctx, ast.Load)
        for info in chain
        for n in ast.walk(info.node)
    )


def check_source(src) -> tuple[list[str], list[str]]:
    """(problems, notes) of the version surface (`surface.SURFACE`) in one release's sources
    (`srcindex.Source`). Problems: a member missing, a method's parameters changed, an overridden hook no
    longer called, a constructor the adapter skips changed. Notes: methods whose bodies changed since the
    release the adapter was written against (review them)."""
    from hybrid_kv import srcindex as S
    from hybrid_kv.vllm.surface import BYPASSED, REVIEWED, SURFACE

    problems: list[str] = []
    notes: list[str] = []
    version = _version_key(src.version())
    for o in SURFACE:
        if o.since and version and version < _version_key(o.since):
            continue
        where = f"{o.module}:{o.cls}" if o.cls else o.module
        if o.cls:
            chain = S.mro(src, o.module, o.cls)
            if not chain:
                problems.append(f"{where}: class not found")
                continue
            methods = {n: f for info in reversed(chain) for n, f in info.methods.items()}
            attrs = set().union(*(info.attrs for info in chain))
        else:
            if src.tree(o.module) is None:
                problems.append(f"{where}: module not found")
                continue
            found = {n: S.find_function(src, o.module, n) for n in o.functions}
            methods = {n: f for n, f in found.items() if f is not None}
            attrs = set()
        for kind, table in (("override", o.override), ("call", o.call), ("function", o.functions)):
            for name, want in table.items():
                fn = methods.get(name)
                if fn is None:
                    problems.append(f"{where}.{name}: {kind} target missing")
                    continue
                if (p := _params_problem(S, fn, want)) is not None:
                    problems.append(f"{where}.{name}: {p}")
                if kind == "override" and name != "__init__" and not _called(S, src, name, chain):
                    problems.append(f"{where}.{name}: overridden, but vLLM no longer calls it")
                digest = REVIEWED.get((o.cls, name))
                if digest is not None and S.body_digest(fn) != digest:
                    if (o.cls, name) in BYPASSED:
                        problems.append(f"{where}.{name}: changed, and the adapter skips it")
                    else:
                        notes.append(f"{where}.{name}: body changed since 0.32.0 (review the {kind})")
        for name in (o.read + " " + o.fields).split():
            if name not in attrs and name not in methods:
                problems.append(f"{where}.{name}: attribute missing")
        envs = src.files.get(o.module, "") if o.env else ""
        problems += [f"{where}.{name}: setting missing" for name in o.env.split() if f'"{name}"' not in envs]
    return problems, notes


def main(argv: list[str] | None = None) -> int:
    """Check each given vLLM source (directory, sdist or wheel) against the version surface; print a line
    per release and each problem. Exit status 1 when any release has a problem."""
    import argparse

    from hybrid_kv.srcindex import Source

    ap = argparse.ArgumentParser(prog="python -m hybrid_kv.vllm.compat", description=main.__doc__)
    ap.add_argument("sources", nargs="+", help="vLLM source: a directory holding vllm/, an sdist or a wheel")
    args = ap.parse_args(argv)
    bad = 0
    for path in args.sources:
        src = Source(path)
        problems, notes = check_source(src)
        status = "supported" if release(src.version()) in SUPPORTED else "not in SUPPORTED"
        print(f"vLLM {src.version()} ({path}): {len(problems)} problem(s), {len(notes)} note(s); {status}")
        print("".join(f"  problem: {p}\n" for p in problems) + "".join(f"  note: {n}\n" for n in notes), end="")
        bad |= bool(problems)
    return int(bad)


if __name__ == "__main__":
    raise SystemExit(main())
