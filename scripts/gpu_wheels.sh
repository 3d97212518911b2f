#!/usr/bin/env bash
# Download, on a machine with network, the wheels a GPU machine without network needs to run volfm: the ones of
# volfm's dependencies that a CUDA image with torch, triton, lightning, transformers, numpy and scipy lacks. They land
# in .whl/ (git-ignored through .git/info/exclude), about 21 MB; scripts/gpu_check.sh installs them there.
# SimpleITK (53 MB) and torchio are left out: volfm imports them only where DICOM/NRRD reading or augmentation is
# used, and `volfm bench gpu` uses neither.
#   bash scripts/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12, the GPU image's Python
set -euo pipefail
PY=${1:-3.12}
DEST=${WHEELS:-.whl}
mkdir -p "$DEST"
EXCLUDE=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
if [ -n "$EXCLUDE" ] && [ "${DEST#/}" = "$DEST" ]; then  # a folder inside the checkout: keep it out of git
  mkdir -p "$(dirname "$EXCLUDE")"; grep -qx "/$DEST/" "$EXCLUDE" 2>/dev/null || echo "/$DEST/" >> "$EXCLUDE"; fi
PACKAGES=(  # the versions that ran `volfm bench gpu` on an H200 (torch 2.11, Python 3.12) on 2026-12-04
  blosc2==4.15.0 ndindex==1.10.1                                                          # the compressed store
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5  # blosc2's (lazy) needs
  monai==1.6.1 nibabel==5.4.2 pydicom==3.0.2 isal==1.9.1 simple-icd-10-cm==1.5.0           # volfm's own imports
  jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0                   # LightningCLI (volfm fit)
)
# blosc2 also imports msgpack, httpx, rich and threadpoolctl, and the rest needs numpy, scipy, PyYAML, tqdm,
# matplotlib, safetensors, tokenizers, transformers and lightning: the CUDA image has them; add them here if yours
# does not (scripts/gpu_check.sh says which import fails).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" "${PACKAGES[@]}"
du -sh "$DEST"
