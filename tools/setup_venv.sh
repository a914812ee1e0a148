#!/usr/bin/env bash
# Create or reuse .venv/ at the repository root and install what the project needs.
# Usage: tools/setup_venv.sh [requirements file]   (default: requirements.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=${1:-requirements.txt}
python=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.installed-$(cat requirements*.txt | sha1sum | cut -c1-12)-$(basename "$requirements")"
[ -f "$stamp" ] && exit 0

# A plain `torch` requirement would pull CUDA wheels; take the pinned build unless one is installed already.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet torch==2.13.0
fi
.venv/bin/python -m pip install --quiet -r "$requirements"
touch "$stamp"
