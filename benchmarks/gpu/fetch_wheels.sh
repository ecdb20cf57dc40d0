#!/usr/bin/env bash
# Download, on a machine with pip access, the wheels the GPU check needs and a bare CUDA image with
# Python 3.12 lacks (it has torch, triton, transformers, safetensors, pytest, pyyaml, nvidia-ml-py).
# They land in .whl/ (git-ignored); benchmarks/gpu/check.sh installs the ones still missing there.
#   bash benchmarks/gpu/fetch_wheels.sh            # ~20 MB
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

# Pinned so that a check run months later installs what was tested; --no-deps, so every dependency
# the target image may lack is listed here by hand (what `Requires-Dist` names, minus what it has).
WHEELS=(
    megatron-core==0.16.1 liger-kernel==0.8.5 pytest-timeout==2.4.0
    math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
    aiohttp==3.14.5 aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl
    tensorboard==2.21.0 tensorboard-data-server absl-py grpcio markdown werkzeug
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d .whl "${WHEELS[@]}"
du -sh .whl
