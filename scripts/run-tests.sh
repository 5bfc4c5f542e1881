#!/usr/bin/env bash
# Runs the whole suite; exits non-zero when it fails or when no test ran.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "no test ran" >&2
  exit 1
fi
exit "$rc"
