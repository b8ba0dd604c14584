"""The paths UCX chose, read from its protocol tables (`UCX_PROTO_INFO=y` prints one per endpoint config).

Each table: one or two header cells (the endpoint config, then the operation, e.g. ``remote memory read by
ucp_get*(multi) into cuda/GPU0 from cuda/dev[1]``), column titles, then rows (range | protocol | transport).
`paths(text)` flattens every table row to ``header / header | range | protocol | transport`` (log prefixes
dropped, duplicates kept once, in order); `vram(paths)` keeps the GPU-to-GPU READs and WRITEs, the ones the
VRAM transfer's numbers depend on.

    python bench/gpu/ucx_proto.py LOG     (prints the GPU-to-GPU paths; exit 1 if any is software emulation)
"""

from __future__ import annotations

import re
import sys

_PREFIX = re.compile(r"^\[\d+\.\d+\]\s+\[[^\]]*\]\s+(.*)$")  # "[1796368995.496260] [vm:547  :0]   | ..."
_TITLES = ("Range", "Count")


def paths(text: str) -> list[str]:
    out: dict[str, None] = {}
    header: list[str] = []
    rows_seen = False
    for line in text.splitlines():
        m = _PREFIX.match(line)
        s = (m.group(1) if m else line).strip()
        if not s.startswith("|"):
            continue  # borders ("+---+") and everything that is not a table
        cells = [c.strip() for c in s.strip("|").split("|")]
        if len(cells) == 1:  # a header cell: a new table starts after rows
            if rows_seen:
                header, rows_seen = [], False
            header.append(cells[0])
            continue
        if cells[0] in _TITLES:
            continue
        rows_seen = True
        out[" / ".join(header) + " | " + " | ".join(cells)] = None
    return list(out)


def vram(all_paths: list[str]) -> list[str]:
    """The READs and WRITEs between GPU memories (both sides named cuda)."""
    keep = []
    for p in all_paths:
        head = p.split(" | ")[0]
        if ("remote memory read" in head or "remote memory write" in head) and head.count("cuda") >= 2:
            keep.append(p)
    return keep


def emulated(vram_paths: list[str]) -> bool:
    return any("emulation" in p for p in vram_paths)


if __name__ == "__main__":
    found = vram(paths(open(sys.argv[1], errors="replace").read()))
    print("\n".join(found) or "no GPU-to-GPU READ or WRITE in the log's protocol tables")
    raise SystemExit(1 if emulated(found) else 0)
