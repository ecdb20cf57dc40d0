"""Config-time refusals of GPU layouts that would fail later (issue 13), and what is derived instead.

Each bad combination fails in ``load_config`` (before Megatron, servers or data) with one line that
names the values in conflict: float32 with Transformer Engine (no fp32 THD attention backend), fp16
with a loss scale that does not scale, a collective timeout shorter than what rank 0 makes the other
ranks wait, an FP8 token budget whose per-rank rows are not multiples of 16, and a loopback
weight-update master address with engines on other hosts.
"""

from __future__ import annotations

import pytest

from megatron_lcr.config import load_config
from megatron_lcr.train.micro_batches import PackLayout
from megatron_lcr.train.rl.config import COLLECTIVE_MARGIN_S, RLRunConfig

TINY = "examples/tiny/depo.yaml"


def refused(overrides: list[str]) -> str:
    with pytest.raises(ValueError) as err:
        load_config(RLRunConfig, TINY, overrides)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_float32_with_transformer_engine_is_refused_and_auto_picks_local(monkeypatch):
    msg = refused(["model.transformer_impl=transformer_engine"])  # the tiny config is float32
    assert "params_dtype 'float32' with transformer_impl='transformer_engine'" in msg
    assert "use params_dtype 'bfloat16' or transformer_impl 'local'" in msg
    assert "fp8='e4m3'" in refused(["model.fp8=e4m3"])
    from megatron_lcr.models import builder

    # As on an NGC image (TE and a GPU present): 'auto' keeps float32 on the local spec, bf16 on TE.
    monkeypatch.setattr(builder, "te_available", lambda: True)
    assert load_config(RLRunConfig, TINY, []).model.transformer_impl == "auto"
    assert builder.use_transformer_engine(load_config(RLRunConfig, TINY, []).model) is False
    assert builder.use_transformer_engine(load_config(RLRunConfig, TINY, ["model.params_dtype=bfloat16"]).model)


def test_fp16_needs_a_loss_scale_that_scales():
    msg = refused(["model.params_dtype=float16", "optimizer.loss_scale=1.0"])
    assert "model.params_dtype 'float16' with optimizer.loss_scale 1.0 trains without loss scaling" in msg
    assert "applies to model.params_dtype 'float16' only, got 'float32'" in refused(["optimizer.loss_scale=1024"])
    cfg = load_config(RLRunConfig, TINY, ["model.params_dtype=float16"])
    assert cfg.optimizer.loss_scale is None and cfg.optimizer.initial_loss_scale == 2.0**16  # dynamic


def test_collective_timeout_is_derived_from_the_waits_rank_0_imposes():
    cfg = load_config(RLRunConfig, TINY, ["rollout.server.startup_timeout_s=2400"])
    assert cfg.parallel.timeout_s == 2400 + COLLECTIVE_MARGIN_S
    assert load_config(RLRunConfig, TINY, []).parallel.timeout_s == 1800  # torch's default covers it
    cfg = load_config(RLRunConfig, TINY, ["rollout.sync.timeout_s=3000"])
    assert cfg.parallel.timeout_s == 3000 + COLLECTIVE_MARGIN_S
    # Servers given by URL are not started by rank 0: their start-up does not count.
    cfg = load_config(RLRunConfig, TINY, ["rollout.urls=[http://127.0.0.1:30000]",
                                          "rollout.server.startup_timeout_s=5000"])
    assert cfg.parallel.timeout_s == 1800


def test_contradicting_timeouts_are_refused():
    msg = refused(["parallel.timeout_s=1800", "rollout.server.startup_timeout_s=2400"])
    assert "parallel.timeout_s (1800) must exceed rollout.server.startup_timeout_s (2400) by 300 s" in msg
    msg = refused(["parallel.timeout_s=700", "rollout.server.startup_timeout_s=100"])
    assert "rollout.sync.timeout_s (600)" in msg


def test_fp8_rows_are_padded_to_16_tokens_per_rank():
    assert PackLayout.for_layout(1, 1, False, fp8=True).row_multiple == 16
    assert PackLayout.for_layout(2, 1, True, fp8=True).row_multiple == 32  # SP scatters rows over 2 ranks
    assert PackLayout.for_layout(8, 2, True, fp8=True).row_multiple == 256  # cp 2 x tp 8 shards x 16
    assert PackLayout.for_layout(8, 2, True).row_multiple == 16  # without FP8: zigzag 4, cp x tp 16
    msg = refused(["trainer.token_budget=1000", "model.params_dtype=bfloat16", "model.fp8=e4m3"])
    assert "trainer.token_budget (1000) must be a multiple of 16" in msg


def test_loopback_master_address_with_remote_engines_is_refused():
    msg = refused(["rollout.urls=[http://10.0.0.5:30000]", "rollout.sync.master_address=127.0.0.1"])
    assert msg.endswith("rollout.sync.master_address '127.0.0.1' is loopback but engine http://10.0.0.5:30000 is on "
                        "another host: set it to this node's routable address")
    load_config(RLRunConfig, TINY, ["rollout.urls=[http://10.0.0.5:30000]", "rollout.sync.master_address=10.0.0.1"])
