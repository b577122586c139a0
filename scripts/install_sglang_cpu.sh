#!/usr/bin/env bash
# SGLang 0.5.23 on a machine without CUDA, next to the torch already installed (which it never replaces).
#
# SGLang pins torch 2.14.1 and a 370 MB CUDA kernel package, so it is installed without its
# dependencies; then the packages its Engine and launch_server import on a CPU
# (requirements-sglang-cpu.txt) are installed with the current torch held by a constraint; last, the
# start-up shim that lets SGLang's processes import without torchvision is registered
# (flashzo/sglang/boot.py writes a .pth file into site-packages). Needs flashzo installed first:
#     pip install -e ".[dev]"
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "${TMPDIR:-/tmp}"  # never run Python from the checkout's root: its kernels/ would shadow a PyPI package

SGLANG_VERSION=0.5.23
torch_before=$(python -c "import torch; print(torch.__version__)")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==${torch_before}" > "$constraints"

pip install --no-deps "sglang==${SGLANG_VERSION}"
pip install -r "${root}/requirements-sglang-cpu.txt" -c "$constraints"
python -m flashzo.sglang install

torch_after=$(python -c "import torch; print(torch.__version__)")
if [ "$torch_before" != "$torch_after" ]; then
    echo "torch changed from ${torch_before} to ${torch_after}: reinstall torch==${torch_before}" >&2
    exit 1
fi
echo "sglang ${SGLANG_VERSION} installed for CPU next to torch ${torch_after}"
