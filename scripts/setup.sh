#!/usr/bin/env bash
# Shared set-up for demo.sh and test.sh: a virtual environment in .venv with chunkmesh installed.
# Usage: source scripts/setup.sh [EXTRAS]   (sets $VENV_PY)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "chunkmesh needs Python >= 3.10 (found: $("$python" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x "$repo/.venv/bin/python" ]; then
  "$python" -m venv "$repo/.venv" || {
    echo "cannot create a virtual environment: on Debian, install python3-venv (apt-get install python3-venv)" >&2
    exit 1
  }
fi
VENV_PY="$repo/.venv/bin/python"
extras="${1:-}"
target="$repo"
[ -n "$extras" ] && target="$repo[$extras]"
"$VENV_PY" -m pip install --quiet --disable-pip-version-check -e "$target"
export PATH="$repo/.venv/bin:$PATH"
# An editable install has no byte code; compile it once (as pip does for a normal install), or every
# meshd, worker and meshctl start compiles the package again where PYTHONDONTWRITEBYTECODE is set.
"$VENV_PY" -m compileall -q "$repo/mesh" "$repo/coordinator" "$repo/codecs" "$repo/bench" >/dev/null
