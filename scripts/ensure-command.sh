#!/usr/bin/env bash
# Make sure a program the tests start is installed: ensure-command.sh COMMAND DEBIAN-PACKAGE.
# The tests start their own redis-server and dnsmasq on free ports; the distributions'
# services are not needed.
set -euo pipefail
command_name=$1 package=$2
export PATH="$PATH:/usr/sbin:/sbin"  # dnsmasq lives in sbin
if command -v "$command_name" >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing $package with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "$package" >/dev/null
  (service "$package" stop || true) >/dev/null 2>&1
  command -v "$command_name" >/dev/null
  exit 0
fi
cat >&2 <<MSG
$command_name is missing and this user cannot install it. Install it, then re-run:
  Debian/Ubuntu: sudo apt-get install $package
  macOS:         brew install $command_name
MSG
exit 1
