#!/usr/bin/env bash
# The prepared GPU run (see bench/gpu/run.py): bash bench/gpu/run.sh OUT [--dry-run]
# On the GPU machine (no network): the NIXL wheels carried in .whl/ (made by bench/gpu/fetch_wheels.sh on a
# machine with a package index) are installed first, then hybrid-kv is used from the working tree.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: bench/gpu/run.sh OUT [--dry-run]}
shift
py=$(command -v python3 || command -v python)
case " $* " in *" --dry-run "*) dry=1 ;; *) dry=0 ;; esac
if [ "$dry" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hkv-site .whl/*.whl; then
    export PYTHONPATH=/tmp/hkv-site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "run.sh: the wheels in .whl/ do not install here; steps that need NIXL will be skipped" >&2
  fi
fi
# hybrid-kv from this tree (the kernels live in kernels/, installed as hybrid_kv.kernels by pip -e)
# An offline host whose setuptools is older than the build needs gets the package by a link instead (this is a
# throwaway copy of the tree).
if ! "$py" -c 'import hybrid_kv.kernels' 2>/dev/null; then
  "$py" -m pip install -q --no-deps --no-build-isolation -e . || { [ -e hybrid_kv/kernels ] || ln -s ../kernels hybrid_kv/kernels; }
fi
exec "$py" bench/gpu/run.py "$out" "$@"
