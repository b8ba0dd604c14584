"""Which vLLM releases the connectors support, checked at start-up.

The connectors subclass vLLM's NIXL connector and workers and use members of them that vLLM does not
promise to keep (issue #32 read 0.33 and 0.34: the private NIXL worker methods change every release; not
yet checked here). So each supported release is named here, and any other is refused at start-up, naming both,
unless the operator accepts the risk with ``HYBRID_KV_ALLOW_UNSUPPORTED_VLLM=1`` (then a warning is logged).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

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
