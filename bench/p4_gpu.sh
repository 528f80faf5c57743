#!/usr/bin/env bash
# P4 on the GPU host, as one prepared run (each start of that machine costs minutes).
#
# Here:  ../shared/gpu/prepare.sh requirements.txt      # fills .gpu-carry/ (wheels + redis-server)
# There: source .gpu-carry/setup.sh && bash bench/p4_gpu.sh
#        (setup.sh installs the wheels into /tmp/site, starts Redis on 127.0.0.1:6379)
# On a CPU, to test the script itself: P4_TINY=1 PYTHON=.venv/bin/python bash bench/p4_gpu.sh
#
# Writes p4.json, p4.log, the two worker logs and gpu.txt into $OUT (default ./p4-out).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/p4-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import sys, torch, transformers, django, rq; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__, "django", django.__version__, "rq", rq.__version__)'
} | tee "$OUT/gpu.txt"
set +e
"$PY" bench/p4_gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/p4.log"
status=${PIPESTATUS[0]}
set -e
echo "p4_gpu.py exited $status"
exit "$status"
