#!/usr/bin/env bash
# Every GPU figure in one command, on a GPU machine (no network needed): installs the wheels in .whl/ (made by
# scripts/gpu_wheels.sh) if there are any, installs this checkout without touching the machine's torch, and runs
#   volfm bench gpu --out ${OUT:-bench_gpu} [ARGS...]
# Results: bench_gpu.json and bench_gpu.md in that folder (the step logs under work/logs).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/volfm-site}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" --upgrade "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout, whatever pip can or cannot install here
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
python3 - <<'PY' || exit 2
import importlib, sys
missing = []
for name in ("torch", "triton", "lightning", "transformers", "monai", "nibabel", "blosc2", "safetensors", "yaml",
             "scipy", "tqdm", "matplotlib", "pydicom", "isal", "simple_icd_10_cm"):
    try:
        importlib.import_module(name)
    except Exception as exc:  # one line per missing package, then stop before any GPU time is spent
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
if missing:
    sys.exit("gpu_check.sh: cannot import " + "; ".join(missing) + " -- add its wheel to .whl/ (scripts/gpu_wheels.sh)")
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -m volfm.cli.main bench gpu --out "${BENCH_OUT:-bench_gpu}" "$@"
