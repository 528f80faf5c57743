#!/usr/bin/env bash
# Every GPU check of the hf_local backend and the GPU worker, as one prepared run (each start of the
# GPU machine costs minutes; ~8-9 minutes on an H200 in all, estimated from the steps run apart).
#
# Here:  printf -- '-r requirements.txt\npytest==9.2.0\npytest-django==4.14.0\n' > .gpu-req.txt
#        ../shared/gpu/prepare.sh .gpu-req.txt          # wheels (pytest included) + redis-server
# There: source .gpu-carry/setup.sh && bash bench/gpu_checks.sh
#
# On a CPU, to test the script itself: P4_TINY=1 TEST_HF_DEVICE=cpu PYTHON=.venv/bin/python bash bench/gpu_checks.sh
#
# In order, each under its own time limit, going on when one fails (the summary says which):
#   1. P4 (bench/p4_gpu.sh)                                  -> $OUT/p4/
#   2. a fresh worker's first batch after the load warm-up -> $OUT/warm128/, $OUT/warm4/
#      (bench/first_generate.py --adapter-only, with the worker's warm-up round and with a 4-token one)
#   3. mixed sampling settings vs all greedy (bench/mixed_sampling.py)   -> $OUT/mixed_sampling.json
#   4. rounds continuing from the KV cache vs one call (bench/rounds.py) -> $OUT/rounds.json
#   5. the hf_local and GPU worker tests on CUDA (TEST_HF_DEVICE=cuda)  -> $OUT/pytest.txt
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-checks-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
summary=()
step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  echo "==> $name (limit ${limit}s)"
  timeout "$limit" "$@"
  local rc=$?
  summary+=("$name: rc $rc in $((SECONDS - started)) s")
}
step p4 240 env OUT="$OUT/p4" PYTHON="$PY" bash bench/p4_gpu.sh
step first-batch 90 bash -c "$PY bench/first_generate.py --adapter-only --round-tokens 128 --out '$OUT/warm128' && $PY bench/first_generate.py --adapter-only --round-tokens 4 --out '$OUT/warm4'"
step mixed-sampling 90 bash -c "$PY bench/mixed_sampling.py | tee '$OUT/mixed_sampling.json'"
step rounds 120 bash -c "$PY bench/rounds.py --reps 3 | tee '$OUT/rounds.json'"
step cuda-tests 240 bash -c "TEST_HF_DEVICE=${TEST_HF_DEVICE:-cuda} TEST_REDIS_URL=redis://127.0.0.1:6379/13 $PY -m pytest -q -p no:cacheprovider tests/test_hf_local.py tests/test_gpu_worker.py 2>&1 | tail -30 | tee '$OUT/pytest.txt'"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
