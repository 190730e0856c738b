#!/usr/bin/env bash
# Sets up a virtual environment in .venv with torch and the build and test tools, then builds and
# installs attnext from this checkout (editable). Safe to run again: it only does what is missing.
#   ATTNEXT_TORCH   the torch requirement to install (default: torch==2.14.1, a CUDA build: with nvcc on
#                   PATH the CUDA module is compiled too)
#   ATTNEXT_VENV    where the environment lives (default: .venv in the repository)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ATTNEXT_VENV:-$root/.venv}"
torch_req="${ATTNEXT_TORCH:-torch==2.14.1}"

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip setuptools wheel ninja
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "setup: installing $torch_req"
  "$py" -m pip install -q "$torch_req"
fi
"$py" -m pip install -q pytest hypothesis numpy matplotlib tqdm
echo "setup: building attnext (pip install --no-build-isolation -e .)"
(cd "$root" && "$py" -m pip install -q --no-build-isolation -e .)
"$py" -c "import torch, attnext; print(f'setup: torch {torch.__version__}, attnext {attnext.__version__} ready')"
