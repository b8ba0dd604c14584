"""Test-only code shipped with the package: the independent oracle (`oracle`), the in-process P -> D
harness (`harness`) and the oracle fill / verification the CLI's rank processes run on request (`fill`).

No production path imports this package at module level: the CLI's `transfer --verify`, `repack` and the
rank processes' fill/verify commands import it when they are asked to fill or verify.
"""
