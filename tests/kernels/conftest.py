"""Kernel tests: the Triton kernels run under Triton's CPU interpreter when there is no GPU.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, so it is set here, before
any test imports ``megatron_lcr.kernels.triton_impl`` (the ops import it lazily).
"""

import os

import pytest
import torch

from megatron_lcr.kernels.config import triton_available

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TRITON_SKIP_REASON = "triton is not installed (pip install triton; on CPU it runs under TRITON_INTERPRET=1)"


def impl_params() -> list:
    """``"torch"`` always; ``"triton"`` when installed (interpreter on CPU, compiled on CUDA)."""
    return [
        "torch",
        pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason=TRITON_SKIP_REASON)),
    ]


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Tiny shapes: one thread. On a shared 2-core machine, OpenMP workers of several processes
    contending for the cores make these small ops ~50x slower than one thread alone (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
