#!/usr/bin/env bash
# Set up everything and run the whole test suite: ./scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

# etcd for the integration tests: Debian's etcd-server. A missing etcd fails the suite, never skips it.
if ! command -v etcd >/dev/null 2>&1 && [ ! -x /usr/bin/etcd ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing etcd-server from Debian's packages..." >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
  else
    echo "etcd is missing: install Debian's etcd-server (sudo apt-get install etcd-server) and run again" >&2
    exit 1
  fi
fi

source scripts/setup.sh test
exec "$VENV_PY" -m pytest -p no:cacheprovider "$@"
