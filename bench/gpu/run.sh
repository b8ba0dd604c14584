#!/usr/bin/env bash
# The prepared GPU run (see bench/gpu/run.py): bash bench/gpu/run.sh OUT [--dry-run]
# On the GPU machine (no network): wheels carried in bench/gpu/wheels (made by bench/gpu/fetch_wheels.sh on a
# machine with a package index) are installed first, then hybrid-kv itself without dependencies.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: bench/gpu/run.sh OUT [--dry-run]}
shift
if [ -d bench/gpu/wheels ] && ls bench/gpu/wheels/*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps bench/gpu/wheels/*.whl
fi
python -c 'import hybrid_kv' 2>/dev/null || python -m pip install -q --no-deps --no-build-isolation -e .
exec python bench/gpu/run.py "$out" "$@"
