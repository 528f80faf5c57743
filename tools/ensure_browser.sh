#!/usr/bin/env bash
# Make sure the real-browser tests (tests/browser) have a Chromium to drive.
#
# Sourced by tools/test.sh:   source tools/ensure_browser.sh
#   - A Chromium already at $CHROMIUM_PATH (default /usr/bin/chromium) is used as it is:
#     nothing is installed, upgraded or removed.
#   - Missing, and we are root with apt-get: Debian's `chromium` package is installed quietly
#     (Playwright drives it through CHROMIUM_PATH; `playwright install` is never run: it downloads
#     a browser build of its own, which needs the internet).
#   - Missing and not installable: a warning, and the browser tests skip, naming what is missing.
# It never fails the caller: the browser is optional for the rest of the suite.

CHROMIUM_PATH="${CHROMIUM_PATH:-/usr/bin/chromium}"
export CHROMIUM_PATH

_browser_install() {
  local log="${TMPDIR:-/tmp}/llmo-chromium-install.log"
  echo "==> installing chromium for the browser tests (apt-get; log: $log)"
  # The package lists may be missing or stale on a fresh machine: update only if the first try fails.
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >"$log" 2>&1; then
    return 0
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >>"$log" 2>&1 &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >>"$log" 2>&1
}

ensure_browser() {
  if [ -x "$CHROMIUM_PATH" ]; then
    echo "==> Chromium for the browser tests: $CHROMIUM_PATH"
    return 0
  fi
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1 && [ "$CHROMIUM_PATH" = /usr/bin/chromium ]; then
    if _browser_install && [ -x "$CHROMIUM_PATH" ]; then
      echo "    installed $("$CHROMIUM_PATH" --version 2>/dev/null || echo chromium)"
      return 0
    fi
    echo "!! apt-get could not install chromium; the browser tests will skip" >&2
    return 0
  fi
  echo "!! No Chromium at $CHROMIUM_PATH; the browser tests will skip." >&2
  echo "!! Install it (sudo apt-get install chromium) or point CHROMIUM_PATH at one." >&2
  return 0
}

ensure_browser
