#!/usr/bin/env bash
# The one script to run on a GPU machine, from a checkout that carries its built modules (attnext/_C*.so):
# nothing is installed or downloaded; the repository is put on PYTHONPATH. In order, each stage going on
# whatever the one before did, each bounded in time so that the whole run fits in GPU_CHECK_BUDGET_S:
#   gpu        is a CUDA device visible to torch?
#   info       python -m attnext.info (printed), and as JSON
#   pytest     pytest tests -m cuda (tests/test_cuda.py and every other CUDA-marked test), JUnit XML
#   sanitizer  compute-sanitizer --tool memcheck on a small forward + backward grid (attnext kernels only)
#   bench      python -m attnext.bench --suite gpu: bf16, FlashAttention's shapes, forward and backward,
#              against torch SDPA with each backend forced (flash, cudnn, efficient), JSON + markdown
# Everything goes to $OUT: <stage>.log, info.txt/.json, pytest.xml, bench.json/.md, stages.tsv, and
# gpu_check.json with every stage's exit status; the summary table is printed last (also summary.txt).
#   OUT                  output folder (default: ./gpu_out)
#   PYTHON               interpreter (default: python3)
#   GPU_CHECK_BUDGET_S   time for the whole run in seconds (default: 285)
#   GPU_CHECK_SANITIZERS compute-sanitizer tools, comma-separated (default: memcheck; e.g. memcheck,racecheck)
#   GPU_CHECK_BENCH_ARGS extra arguments for the benchmark (e.g. "--shapes *,*,4096,*")
# Exit status: 0 every stage passed; 1 a stage failed or ran out of time; 2 no GPU visible (GPU stages skipped).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/gpu_out}"
PY="${PYTHON:-python3}"
budget="${GPU_CHECK_BUDGET_S:-285}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
: > "$OUT/stages.tsv"
start=$SECONDS
reserve=12  # kept back for the summary

record() {  # name status rc seconds note log
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${6:-}" >> "$OUT/stages.tsv"
}

limit_for() {  # the seconds a stage may take: its cap, or what is left of the budget
  local left=$(( budget - (SECONDS - start) - reserve ))
  (( left < $1 )) && echo "$left" || echo "$1"
}

run_stage() {  # name cap command...: runs it under a time limit, output to $OUT/name.log, records its status
  local name=$1 cap=$2; shift 2
  local limit log="$OUT/$name.log" rc=0 t0=$SECONDS status=ok
  limit=$(limit_for "$cap")
  if (( limit < 5 )); then
    record "$name" skipped "" 0 "no time left in the ${budget} s budget"
    return 0
  fi
  echo "gpu_check: $name (limit ${limit} s)"
  if command -v timeout > /dev/null; then
    timeout -k 5 "$limit" "$@" > "$log" 2>&1 || rc=$?
  else
    "$@" > "$log" 2>&1 || rc=$?
  fi
  if (( rc == 124 || rc == 137 )); then status=timeout; elif (( rc != 0 )); then status=FAIL; fi
  record "$name" "$status" "$rc" $(( SECONDS - t0 )) "$([[ $status == timeout ]] && echo "over ${limit} s")" "$log"
  return 0
}

skip_gpu_stages() {  # reason
  local name tool tools
  IFS=, read -r -a tools <<< "${GPU_CHECK_SANITIZERS:-memcheck}"
  for name in pytest "${tools[@]/#/sanitizer-}" bench; do record "$name" skipped "" 0 "$1"; done
}

# gpu: torch's view of the machine
gpu=""
no_gpu_reason="skipped: no GPU"
t0=$SECONDS
if gpu=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' \
    2> "$OUT/gpu.log"); then
  if [[ -n $gpu ]]; then
    record gpu ok 0 $(( SECONDS - t0 )) "$gpu" "$OUT/gpu.log"
  else
    record gpu skipped 0 $(( SECONDS - t0 )) "no GPU: torch.cuda.is_available() is False" "$OUT/gpu.log"
  fi
else
  record gpu FAIL 1 $(( SECONDS - t0 )) "$PY cannot import torch" "$OUT/gpu.log"
  no_gpu_reason="skipped: torch does not import"
fi

# info: printed here, and kept as JSON
run_stage info 60 "$PY" -m attnext.info
cp "$OUT/info.log" "$OUT/info.txt" 2> /dev/null && cat "$OUT/info.txt"
"$PY" -m attnext.info --json > "$OUT/info.json" 2> /dev/null || true

if [[ -z $gpu ]]; then
  skip_gpu_stages "$no_gpu_reason"
else
  run_stage pytest 100 "$PY" -m pytest tests -m cuda -q -p no:cacheprovider --junitxml="$OUT/pytest.xml"

  sanitizer=$(command -v compute-sanitizer || true)
  [[ -z $sanitizer && -x /usr/local/cuda/bin/compute-sanitizer ]] && sanitizer=/usr/local/cuda/bin/compute-sanitizer
  IFS=, read -r -a tools <<< "${GPU_CHECK_SANITIZERS:-memcheck}"
  for tool in "${tools[@]}"; do
    if [[ -z $sanitizer ]]; then
      record "sanitizer-$tool" skipped "" 0 "skipped: compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
      continue
    fi
    # No caching allocator: an access past a tensor's end then hits memory that is not allocated.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_stage "sanitizer-$tool" 75 "$sanitizer" --tool "$tool" \
      --kernel-name kns=attnext --error-exitcode 3 --print-limit 20 "$PY" -m attnext.bench.gpu_check grid
  done

  limit=$(limit_for 600)
  read -r -a bench_extra <<< "${GPU_CHECK_BENCH_ARGS:-}"
  run_stage bench 600 "$PY" -m attnext.bench --suite gpu --device cuda --reps 7 --warmup 2 --slow-ms 15 \
    --slow-reps 4 --time-limit $(( limit > 40 ? limit - 25 : limit / 2 )) --json "$OUT/bench.json" \
    --markdown "$OUT/bench.md" ${bench_extra[@]+"${bench_extra[@]}"}
fi

echo
if ! "$PY" "$root/attnext/bench/gpu_check.py" summarize "$OUT"; then
  echo "gpu_check: the summary could not be made; the stages (name, status, exit, seconds, note, log):"
  cat "$OUT/stages.tsv"
fi
if awk -F'\t' '$2 == "FAIL" || $2 == "timeout" { found = 1 } END { exit !found }' "$OUT/stages.tsv"; then
  exit 1
fi
if awk -F'\t' '$1 == "gpu" && $2 == "skipped" { found = 1 } END { exit !found }' "$OUT/stages.tsv"; then
  exit 2
fi
exit 0
