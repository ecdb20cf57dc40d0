#!/usr/bin/env bash
# Download, on a machine with pip access, the wheels the GPU check imports and a bare CUDA image with
# Python 3.12 may lack or have too old (it has torch, triton, transformers and their dependencies,
# safetensors, pytest, pyyaml, nvidia-ml-py). They land in .whl/ (git-ignored); on the device
# benchmarks/gpu/install_missing.py installs each one whose distribution is absent there or does not
# satisfy the requirement (setup.py's, or a carried wheel's Requires-Dist).
#   bash benchmarks/gpu/fetch_wheels.sh                       # ~7 MB
#   PY_VERSION=3.11 WHEELS=/tmp/whl311 bash benchmarks/gpu/fetch_wheels.sh   # for another Python
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

# Pinned to the versions the CPU suite runs with, so a check run months later installs what was
# tested. --no-deps, so each dependency of a carried wheel is listed by hand (its Requires-Dist minus
# what the image has); install_missing.py reads those Requires-Dist and stops, naming it, if one is
# neither on the image nor here. Not carried: tensorboard (Megatron imports it under
# `try/except ImportError` and the check runs with trainer.tensorboard=false), matplotlib (lcr plot).
WHEELS_PINNED=(
    megatron-core==0.16.1 packaging==26.4                   # megatron-core needs packaging>=24.2
    liger-kernel==0.8.5 pytest-timeout==2.4.0 psutil==7.2.2 tqdm==4.70.1
    aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 attrs==26.1.0 frozenlist==1.8.0
    multidict==7.2.1 propcache==0.5.4 yarl==1.25.1 idna==3.21 typing_extensions==4.16.0
    math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux_2_12_x86_64 manylinux2010_x86_64 manylinux_2_5_x86_64
           manylinux1_x86_64)
dest=${WHEELS:-.whl}

mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
    --implementation cp "${PLATFORMS[@]/#/--platform=}" -d "$dest" "${WHEELS_PINNED[@]}"
du -sh "$dest"
