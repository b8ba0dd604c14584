#!/usr/bin/env bash
# NIXL for the offline GPU host (Python 3.12, x86_64, CUDA 13; its image already has torch, triton, pytest,
# hypothesis, rich and einops), into the repo's git-ignored .whl/ folder, which the device call carries.
# nixl-cu13's expert-parallel kernels (nixl_ep_cu13, ~95 MB unpacked) are dropped: hybrid-kv does not use
# them, and the whole working tree that travels must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d .whl nixl==1.5.1 nixl-cu13==1.5.1
whl=$(ls .whl/nixl_cu13-*.whl)
zip -q -d "$whl" 'nixl_ep_cu13/*' || true
ls -la .whl
