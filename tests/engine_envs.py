"""Where the real engines' Python environments are (made by ``tools/engine_venv.sh``), for tests.

SGLang and vLLM live in their own virtual environments (each brings its own torch build). A test that
needs one skips, saying how to make it, when it is absent.
"""

from __future__ import annotations

import os
import sys

from megatron_lcr.rollout.sglang import engine_venv

_VARS = {"sglang": "LCR_SGLANG_PYTHON", "vllm": "LCR_VLLM_PYTHON"}


def engine_python(engine: str) -> tuple[str | None, str]:
    """``(python, "")`` for the engine's interpreter, or ``(None, why it is missing)``. ``lcr-serve`` is
    this interpreter."""
    if engine == "lcr-serve":
        return sys.executable, ""
    var, venv = _VARS[engine], engine_venv(engine)
    if os.environ.get(var):
        return os.environ[var], ""
    if (venv / ".complete").exists():
        return str(venv / "bin" / "python"), ""
    return None, (f"{engine} is not installed: run `bash tools/engine_venv.sh {engine}` (.ci/run does) "
                  f"or set {var}")
