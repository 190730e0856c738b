#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite: the torch-free C++ kernel tests (CMake + CTest)
# and the pytest suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
py="${ATTNEXT_VENV:-$root/.venv}/bin/python"
cd "$root"
echo "test: C++ kernel tests (CTest)"
cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build/cmake -j 2 > /dev/null
ctest --test-dir build/cmake --output-on-failure
echo "test: pytest"
"$py" -m pytest tests -q "$@"
