#!/usr/bin/env bash
# Create $VENV (default .venv) and install the given requirements file into it.
# Re-running is cheap: pip runs only when the requirements changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
req="${1:-requirements.txt}"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  # Debian's python3 lacks ensurepip until python3-venv is installed; a failed attempt
  # leaves a half-made venv behind, so start clean.
  if ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
      echo "==> installing python3-venv (apt-get)"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
      echo "!! Python venv support is missing: sudo apt-get install python3-venv" >&2
      exit 1
    fi
  fi
  rm -rf "$VENV"
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
stamp="$VENV/.installed-$(basename "$req" .txt)"
# The client's pyproject.toml too: it is installed editable (-e ./client), so only a change of its
# dependencies or its `llmo` command needs pip again.
digest=$(cat "$req" requirements.txt client/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
  echo "==> installing $req into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
  echo "$digest" > "$stamp"
fi
