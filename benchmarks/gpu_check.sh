#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py says what it runs and writes):
#   benchmarks/gpu_check.sh [OUT_DIR] [gpu_check.py options]      (OUT_DIR default: $OUT, else gpu-check/)
# Installs the wheels of .gpu-kit/wheels (benchmarks/gpu_kit.py packs them on a machine with the package index)
# into a folder of its own, with no index and no network; histoflow itself is read from src/.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-check}}"
shift || true
if compgen -G ".gpu-kit/wheels/*.whl" > /dev/null; then
  site="${TMPDIR:-/tmp}/histoflow-gpu-site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    .gpu-kit/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec python3 benchmarks/gpu_check.py --out "$out" "$@"
