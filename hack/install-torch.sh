#!/usr/bin/env bash
# Installs PyTorch for the `torch` test group only, cached outside the repo.
#
# PyPI's torch for Linux x86_64 is a CUDA build: even its CPU code links libcudart and
# libcupti (libtorch_cpu.so) and libtorch_python.so links cuDNN, cuBLAS, NCCL..., so
# `pip install --no-deps torch` does not import. We install torch with its dependencies
# into a --target folder of its own (about 5 GB, about a minute here, once), never into the
# project's virtualenv, and the torch tests hand it to the Ray workers through PYTHONPATH
# (as `aifactory run --pythonpath ~/.cache/aifactory/torch` does for the training samples).
#
# usage: hack/install-torch.sh [PYTHON]   prints the folder (also linked as $CACHE/torch)
set -euo pipefail

PYTHON=${1:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.15.0}
CACHE=${AIFACTORY_CACHE:-$HOME/.cache/aifactory}
tag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
target="$CACHE/torch-$TORCH_VERSION-$tag"

if [ ! -f "$target/.complete" ]; then
    echo "installing torch $TORCH_VERSION for $tag into $target" >&2
    rm -rf "$target.partial"
    mkdir -p "$CACHE"
    "$PYTHON" -m pip install -q --no-cache-dir --disable-pip-version-check \
        --target "$target.partial" "torch==$TORCH_VERSION" >&2
    touch "$target.partial/.complete"
    rm -rf "$target"
    mv "$target.partial" "$target"
fi
ln -sfn "$target" "$CACHE/torch"
echo "$target"
