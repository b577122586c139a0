#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels scripts/gpu_check.sh installs on a lent GPU machine, which
# has torch, triton, transformers and peft but no network: FlashInfer's Python package and what its
# import needs that the machine lacks. Python 3.12, x86-64 Linux, as on that machine. Run it here
# (where PyPI is reachable), then carry .whl to the device machine with the check.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="${root}/.whl"
mkdir -p "$dest"
WHEELS=(flashinfer-python==0.6.13 apache-tvm-ffi==0.1.15.post2 nvidia-cudnn-frontend==1.32.0)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" "${WHEELS[@]}"
total=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
echo "$(ls "$dest"/*.whl | wc -l) wheels, $((total / 1048576)) MiB in $dest"
if [ "$total" -gt $((60 * 1048576)) ]; then
    echo "more than 60 MiB: the working tree and .whl must travel in 64 MiB together" >&2
    exit 1
fi
