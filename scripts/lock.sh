#!/usr/bin/env bash
# Refresh the lock files (`make lock`): every package an install takes, pinned to the version
# pip's resolver picks today, without installing anything.
#   requirements/gateway.lock  the gateway alone (the gateway image, the worker image's gateway
#                              side, and the base of every install)
#   requirements/cpu.lock      the gateway, vLLM's CPU build and the test tools (`make`)
# Installs then take these as constraints (pip -c), so an install on another day gets the same
# versions; re-run this, and `make test`, to move to newer ones.
set -euo pipefail
python="${PYTHON:-.venv/bin/python}"
extra=()
if curl -fsS --max-time 5 -o /dev/null https://download.pytorch.org/whl/cpu/ 2>/dev/null; then
  extra+=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi
lock() {  # lock FILE REQUIREMENT...
  local out="$1"; shift
  "$python" -m pip install -q --dry-run --progress-bar off --ignore-installed "${extra[@]}" --report - "$@" 2>/dev/null \
    | "$python" -c '
import json, sys
report = json.load(sys.stdin)
pins = sorted({(i["metadata"]["name"].lower(), i["metadata"]["version"]) for i in report["install"]
               if i["metadata"]["name"].lower() != "fireworks-gateway"})
print("# Made by scripts/lock.sh (make lock); do not edit by hand.")
print("\n".join(f"{name}=={version}" for name, version in pins))' > "$out.new"
  mv "$out.new" "$out"
  echo "[lock] $out: $(grep -vc '^#' "$out") packages"
}
mkdir -p requirements
lock requirements/gateway.lock .
lock requirements/cpu.lock ".[engine-cpu,test]"
