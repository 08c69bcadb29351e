#!/usr/bin/env bash
# Make sure redis-server is on PATH: the end-to-end tests start their own on a free port.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing redis-server with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq redis-server >/dev/null
  # The tests start their own server; the distribution's service is not needed.
  (service redis-server stop || true) >/dev/null 2>&1
  command -v redis-server >/dev/null
  exit 0
fi
cat >&2 <<'MSG'
redis-server is missing and this user cannot install it. Install it, then re-run:
  Debian/Ubuntu: sudo apt-get install redis-server
  macOS:         brew install redis
  conda:         conda install -c conda-forge redis
MSG
exit 1
