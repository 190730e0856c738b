#!/usr/bin/env bash
# Sets everything up, then runs the benchmark: attnext against torch's SDPA on the default device.
# Extra arguments go to python -m attnext.bench (see --help), e.g. --suite anchors --threads 1,2.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec "${ATTNEXT_VENV:-$root/.venv}/bin/python" -m attnext.bench "$@"
