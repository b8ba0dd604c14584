"""The independent correctness oracle (`state`) and the fill and verification built on it (`fill`): what the
tests, `hybrid-kv repack` and the CLI's `transfer --verify` check moved bytes against.

Independent of the data path by construction: nothing here imports the plan, the kernels, the staging
core, the state mover or either shell, and none of those that run inside a serving engine (`staging`,
`mover`, `vllm`) imports this package (tests/test_layering.py).
"""
