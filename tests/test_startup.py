"""megatron_lcr.startup: exactly the known library warnings are silenced; one backend line on rank 0.

The real start (``lcr pretrain`` with every warning shown) is in tests/train/test_pretrain.py.
"""

import importlib.util
import warnings

import pytest
import torch

from megatron_lcr.models.builder import ModelConfig
from megatron_lcr.startup import announce_backend, backend_summary, quiet_known_warnings

# What this stack printed at the start of `lcr pretrain` / `lcr train` on CPU (megatron-core 0.16,
# torch 2.13): (message, category, the module Python attributes it to).
SEEN_AT_START = [
    ("Transformer Engine and Apex are not installed. Falling back to local implementations of "
     "multi_tensor_applier and multi_tensor_scale", UserWarning,
     "megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision"),
    ("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning,
     "megatron.core.optimizer"),
    ("Transformer Engine and Apex are not installed. Falling back to local implementations of "
     "multi_tensor_applier, multi_tensor_l2norm, and multi_tensor_scale", UserWarning,
     "megatron.core.optimizer.clip_grads"),
    ("Apex is not installed. Falling back to Torch Norm", UserWarning, "megatron.core.models.backends"),
    ("Apex is not installed. Falling back to Torch Norm", UserWarning, "megatron.core.models.gpt.gpt_layer_specs"),
    ("full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.", UserWarning,
     "megatron.core.transformer.transformer_config"),
    ("The following imports from `dynamic_context.py` will be removed in this file in `megatron-core` 0.14.",
     DeprecationWarning, "megatron.core.inference.contexts"),
    ("The 'megatron.core.transformer.custom_layers.transformer_engine' \n    module is deprecated",
     DeprecationWarning, "megatron.core.transformer.multi_latent_attention"),
    ("MLP requires ffn_hidden_size, but it was not provided. Using config.ffn_hidden_size by default.",
     DeprecationWarning, "megatron.core.transformer.spec_utils"),
    ("Warning: tp_group is None, using default tp group. Passing tp_group will be mandatory soon",
     DeprecationWarning, "megatron.core.tensor_parallel.layers"),
    ("`torch.jit.script_method` is deprecated. Please switch to `torch.compile` or `torch.export`.",
     DeprecationWarning, "torch.jit._script"),
]


def shown(message: str, category: type[Warning], module: str) -> bool:
    """Whether a warning issued from ``module`` gets through once ``quiet_known_warnings`` has run."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # everything shows unless a filter of ours says otherwise
        quiet_known_warnings()
        warnings.warn_explicit(message, category, filename=f"{module}.py", lineno=1, module=module)
    return len(caught) == 1


@pytest.mark.parametrize("message, category, module", SEEN_AT_START)
def test_the_known_start_up_warnings_are_silenced(message, category, module):
    assert not shown(message, category, module)


def test_an_unknown_warning_still_shows():
    assert shown("something new went wrong", UserWarning, "megatron.core.models.backends")
    assert shown("a new deprecation", DeprecationWarning, "torch.jit._script")
    assert shown("newer API", FutureWarning, "megatron_lcr.train.pretrain.run")


def test_a_known_message_from_another_module_or_of_another_category_still_shows():
    # Matching is by message, category and issuing module: our own code saying the same still shows.
    assert shown("Apex is not installed. Falling back to Torch Norm", UserWarning, "megatron_lcr.models.builder")
    assert shown("full scope is deprecated. Use empty cuda_graph_scope", UserWarning,
                 "megatron.core.transformer.cuda_graphs")
    assert shown("Warning: tp_group is None, using default tp group", UserWarning,  # a DeprecationWarning there
                 "megatron.core.tensor_parallel.layers")


@pytest.fixture
def quiet():
    """As ``lcr`` does before the summary imports Megatron (pytest restores the filters after the test)."""
    quiet_known_warnings()


@pytest.mark.usefixtures("quiet")
@pytest.mark.skipif(
    torch.cuda.is_available() or any(importlib.util.find_spec(m) for m in ("apex", "transformer_engine")),
    reason="the CPU line without Apex and Transformer Engine",
)
def test_backend_summary_on_cpu():
    assert backend_summary(ModelConfig()) == (
        "lcr: CPU: Megatron local layers, torch norms, torch optimizer (no Apex, no Transformer Engine)"
    )


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize(
    "env, printed",
    [({}, True), ({"RANK": "0"}, True), ({"RANK": "1"}, False), ({"SLURM_PROCID": "3"}, False),
     ({"RANK": "0", "SLURM_PROCID": "0"}, True)],
)
def test_only_global_rank_zero_announces(monkeypatch, capsys, env, printed):
    for name in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    announce_backend(ModelConfig())
    out, err = capsys.readouterr()
    assert out == ""  # stdout carries the run's results JSON
    assert err == (backend_summary(ModelConfig()) + "\n" if printed else "")
