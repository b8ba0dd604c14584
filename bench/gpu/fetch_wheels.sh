#!/usr/bin/env bash
# Wheels the GPU machine lacks (Python 3.12, x86_64; it has torch and triton), into bench/gpu/wheels, to be
# carried there with the working tree (the folder is git-ignored).
set -euo pipefail
cd "$(dirname "$0")"
python -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
  --implementation cp -d wheels nixl==1.5.1 nixl-cu12==1.5.1 rich pytest pluggy iniconfig hypothesis \
  sortedcontainers attrs pygments markdown-it-py mdurl einops
ls wheels
