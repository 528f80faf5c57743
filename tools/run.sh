#!/usr/bin/env bash
# `make run`: everything a newcomer needs, on one machine, in the foreground.
#
#   1. Redis at $REDIS_URL: use the one that answers, or start a private one (tools/ensure_redis.sh).
#   2. migrate, collectstatic, bootstrap_demo (a `dev` backend, an active policy, an admin + token).
#   3. gunicorn on $HOST:$PORT (default 127.0.0.1:8000) and one RQ worker; wait for /readyz.
#   4. Submit a demo job with `llmo` (client/), print its result, then a summary (URLs, credentials, examples).
#   5. Keep running until Ctrl-C / SIGTERM; then stop what it started, in order, and wait for it.
#      If gunicorn or the worker dies on its own, show the end of its log and exit non-zero.
#
# Safe to run again: every set-up step is idempotent. Logs: var/log/{web,worker,redis}.log.
# Environment: VENV (.venv), HOST, PORT, WEB_WORKERS (2), REDIS_URL, plus every Django setting.
# This is a development server: DEBUG is on (unless DEBUG is set) and it listens on this machine
# only; HOST=0.0.0.0 shows it to the network (then every host name is allowed, unless ALLOWED_HOSTS says).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8000}"
WEB_WORKERS="${WEB_WORKERS:-2}"
VAR_DIR="${VAR_DIR:-var}"
LOG_DIR="$VAR_DIR/log"
WEB_LOG="$LOG_DIR/web.log"
WORKER_LOG="$LOG_DIR/worker.log"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}" # gunicorn, the worker and manage.py all use it
export PYTHONUNBUFFERED=1                                  # logs reach the files at once (for the tail on a crash)
export DEBUG="${DEBUG:-1}"                                 # the settings default to off (production)

WEB_PID=""
WORKER_PID=""
REDIS_PID="" # set by tools/ensure_redis.sh when it starts a private Redis

# --- Stopping ------------------------------------------------------------------
# stop_proc NAME PID GRACE_S: SIGTERM, wait up to GRACE_S, then SIGKILL its whole process
# group (each child runs in its own session, so that also catches gunicorn's workers).
stop_proc() {
  local name=$1 pid=$2 grace=$3 i
  [ -n "$pid" ] || return 0
  if kill -0 "$pid" 2>/dev/null; then
    echo "    stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 5; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "    $name did not stop within ${grace}s: killing it"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  # Ignore further signals while stopping: with INT back at its default, bash would kill
  # itself half-way (it re-raises a SIGINT that a foreground child died of), leaving
  # processes behind. Each stop below is bounded by its grace period anyway.
  trap - EXIT
  trap '' INT TERM HUP
  if [ -n "$WEB_PID$WORKER_PID$REDIS_PID" ]; then
    echo
    echo "==> stopping"
    # Web first (no new jobs), then the worker (a warm shutdown finishes the job in hand,
    # which still needs Redis), then our private Redis, if any.
    stop_proc "gunicorn" "$WEB_PID" 30
    stop_proc "worker" "$WORKER_PID" 20
    if [ -n "$REDIS_PID" ]; then
      echo "    stopping private redis-server (pid $REDIS_PID)"
      stop_private_redis
    fi
    echo "==> stopped"
  fi
  exit "$rc"
}
trap cleanup EXIT
# A requested stop is a normal end (exit 0, as gunicorn does); the EXIT trap does the work.
trap 'exit 0' INT TERM HUP

# ensure_alive NAME PID_VAR LOG: if that child has exited on its own, say how, show the end
# of its log and exit 1 (the EXIT trap then stops the others).
ensure_alive() {
  local name=$1 var=$2 log=$3 pid st=0 how
  pid=${!var}
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null && return 0
  wait "$pid" || st=$? # bash keeps a dead child's status for us
  printf -v "$var" '%s' "" # nothing left to stop
  how="exit status $st"
  ((st > 128)) && how="killed by signal $((st - 128))"
  echo "!! $name exited unexpectedly ($how); last lines of $log:" >&2
  tail -n 30 "$log" | sed 's/^/   | /' >&2
  exit 1
}
ensure_all_alive() {
  ensure_alive gunicorn WEB_PID "$WEB_LOG"
  ensure_alive worker WORKER_PID "$WORKER_LOG"
  ensure_alive "private redis-server" REDIS_PID "$LOG_DIR/redis.log"
}

# GET a local URL, print the HTTP status (000 when nothing answers). Standard library only.
http_status() {
  "$PY" - "$1" <<'PY'
import sys
import urllib.error
import urllib.request

try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as resp:
        print(resp.status)
except urllib.error.HTTPError as exc:
    print(exc.code)
except Exception:
    print("000")
PY
}

# --- Where the server will be reached ---------------------------------------------
BARE_HOST=${HOST#[} BARE_HOST=${BARE_HOST%]} # an IPv6 literal may come with or without brackets
case "$BARE_HOST" in # BIND for gunicorn, LOCAL_HOST for our own checks, PUBLIC_HOST for you
  0.0.0.0) BIND="0.0.0.0:$PORT" LOCAL_HOST=127.0.0.1 PUBLIC_HOST=localhost ;;
  ::) BIND="[::]:$PORT" LOCAL_HOST=127.0.0.1 PUBLIC_HOST=localhost ;;
  *:*) BIND="[$BARE_HOST]:$PORT" LOCAL_HOST="[$BARE_HOST]" PUBLIC_HOST="[$BARE_HOST]" ;;
  *) BIND="$BARE_HOST:$PORT" LOCAL_HOST=$BARE_HOST PUBLIC_HOST=$BARE_HOST ;;
esac
LOCAL_URL="http://$LOCAL_HOST:$PORT"
if [ -z "${ALLOWED_HOSTS:-}" ]; then # the settings allow only localhost names by default
  case "$BARE_HOST" in
    127.* | ::1 | localhost) ;;
    0.0.0.0 | ::) export ALLOWED_HOSTS="*" ;; # reachable under any of this machine's names
    *) export ALLOWED_HOSTS="localhost,127.0.0.1,[::1],$PUBLIC_HOST" ;;
  esac
fi
BASE_URL="http://$PUBLIC_HOST:$PORT"

# --- 0. Refuse early if the port is taken (before starting anything) ---------------
port_in_use() {
  "$PY" - "$BARE_HOST" "$PORT" <<'PY'
import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
sock = socket.socket(family, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn does: TIME_WAIT is no conflict
try:
    sock.bind((host, port))
except OSError:
    sys.exit(0)  # in use (or not bindable)
finally:
    sock.close()
sys.exit(1)
PY
}
if port_in_use; then
  echo "!! Port $PORT on $BARE_HOST is already in use; stop whatever holds it, or run with PORT=<other port>." >&2
  if command -v ss >/dev/null 2>&1; then
    ss -ltnpH "sport = :$PORT" 2>/dev/null | sed 's/^/   | /' >&2 || true
  fi
  exit 1
fi

mkdir -p "$LOG_DIR"

# --- 1. Redis -------------------------------------------------------------------------
# Sourcing it ensures Redis now and defines stop_private_redis (used by cleanup).
# shellcheck source-path=SCRIPTDIR/..
source tools/ensure_redis.sh

# --- 2. Database, static files, demo data ---------------------------------------------
echo "==> migrating the database"
"$PY" manage.py migrate --noinput --verbosity 1 | sed 's/^/    /'
echo "==> collecting static files"
"$PY" manage.py collectstatic --noinput --verbosity 0
echo "==> seeding the demo backend, routing policy and admin user"
BOOTSTRAP_OUT=$("$PY" manage.py bootstrap_demo --json)
# The credentials are the JSON object on stdout (skip any log line that may precede it).
{ read -r ADMIN_USER && read -r ADMIN_PASSWORD && read -r API_TOKEN; } < <(
  "$PY" -c '
import json, sys
for line in reversed(sys.stdin.read().splitlines()):
    try:
        doc = json.loads(line)
    except ValueError:
        continue
    if isinstance(doc, dict) and "token" in doc:
        print(doc["username"], doc["password"], doc["token"], sep="\n")
        break
' <<<"$BOOTSTRAP_OUT"
) || { echo "!! bootstrap_demo printed no credentials:" >&2; echo "$BOOTSTRAP_OUT" >&2; exit 1; }

# --- 3. Web and worker ------------------------------------------------------------------
# Each in its own session (setsid): Ctrl-C reaches only this script, which then stops them
# in order. setsid does not fork here (we are not a group leader), so $! is the real pid.
echo "==> starting gunicorn on $BIND with $WEB_WORKERS workers (log: $WEB_LOG)"
setsid "$VENV/bin/gunicorn" orchestrator_site.asgi:application -k uvicorn_worker.UvicornWorker \
  -w "$WEB_WORKERS" -b "$BIND" --access-logfile - >"$WEB_LOG" 2>&1 </dev/null &
WEB_PID=$!
echo "==> starting one RQ worker on queues high, normal, low (log: $WORKER_LOG)"
setsid "$PY" manage.py rqworker high normal low >"$WORKER_LOG" 2>&1 </dev/null &
WORKER_PID=$!

echo "==> waiting for $LOCAL_URL/readyz"
for ((i = 0; ; i++)); do
  ensure_all_alive
  code=$(http_status "$LOCAL_URL/readyz")
  [ "$code" = 200 ] && break
  if ((i >= 60)); then # ~30 s
    echo "!! $LOCAL_URL/readyz still answers $code after 30 s; last lines of $WEB_LOG:" >&2
    tail -n 30 "$WEB_LOG" | sed 's/^/   | /' >&2
    exit 1
  fi
  sleep 0.5
done
echo "    ready"

# --- 4. Demo job ------------------------------------------------------------------------
echo "==> submitting a demo job"
DEMO_OK=1
# The client's own command (client/, installed by `make run`): it submits, long-polls for the result,
# prints the result document, and exits non-zero unless the job succeeded.
"$VENV/bin/llmo" --url "$LOCAL_URL" --token "$API_TOKEN" --json \
  submit "Hello from LLM Orchestrator" --wait --wait-timeout 15 2>&1 | sed 's/^/    /' || DEMO_OK=""
if [ -z "$DEMO_OK" ]; then
  echo "!! The demo job did not succeed (see above, and $WORKER_LOG); the server keeps running." >&2
fi

# --- 5. Summary -------------------------------------------------------------------------
if [ -n "$REDIS_PID" ]; then
  REDIS_NOTE="private redis-server, pid $REDIS_PID, stopped on exit; log: $LOG_DIR/redis.log"
else
  REDIS_NOTE="already running; used as is"
fi
cat <<EOF

==> LLM Orchestrator is running

    API root   $BASE_URL/
    Admin      $BASE_URL/admin/    username: $ADMIN_USER    password: $ADMIN_PASSWORD
    API token  $API_TOKEN
    Redis      $REDIS_URL ($REDIS_NOTE)
    Logs       $WEB_LOG  $WORKER_LOG    (tail -f $LOG_DIR/*.log)

    Submit a job, then fetch its result (202 while it runs, 200 when done):

      id=\$(curl -s -X POST $BASE_URL/jobs \\
        -H 'Authorization: Token $API_TOKEN' \\
        -H 'Content-Type: application/json' \\
        -H "Idempotency-Key: \$(date +%s%N)" \\
        -d '{"prompt": "Hello from LLM Orchestrator"}' \\
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
      curl -s -H 'Authorization: Token $API_TOKEN' $BASE_URL/jobs/\$id/result

    Or with the client (docs/client.md):

      export LLMO_URL=$BASE_URL LLMO_TOKEN=$API_TOKEN
      $VENV/bin/llmo submit "Hello from LLM Orchestrator" --priority high --wait

    Press Ctrl-C to stop.

EOF

# --- 6. Run until told to stop, or until a child dies ------------------------------------
# Poll rather than `wait -n`: that misses a child which died before it was called. Ctrl-C
# interrupts the sleep at once (same process group); a SIGTERM is acted on within a second.
while true; do
  ensure_all_alive
  sleep 1
done
