"""rl/objective.py: plain RL as an objective: which rollouts it trains on, what it needs, its loss."""

from __future__ import annotations

import torch

from megatron_lcr.rl.losses import Normaliser, PolicyLossConfig, policy_loss
from megatron_lcr.rl.objective import Needs, PolicyGradient
from megatron_lcr.rl.sequences import Role, Rollout, TokenBatch


def rollout(k: int, **fields) -> Rollout:
    base = dict(sample=None, context="short", prompt=[1, 2], response=[3 + k, 4], engine_logp=[-0.5, -1.5],
                finish_reason="stop", reward=1.0, advantage=0.25 * k)
    return Rollout(**{**base, **fields})


def test_policy_views_leave_out_empty_dropped_and_masked_truncated_rollouts():
    rs = [rollout(0), rollout(1, response=[], engine_logp=[]), rollout(2, in_policy_loss=False),
          rollout(3, finish_reason="length"), rollout(4)]
    masked = PolicyGradient(PolicyLossConfig(name="ppo"), max_response_len=8, mask_truncated=True)
    seqs = masked.sequences(rs, None)
    assert [(s.role, s.rollout, s.advantage) for s in seqs] == [(Role.POLICY, 0, 0.0), (Role.POLICY, 4, 1.0)]
    assert seqs[0].engine_logp == [-0.5, -1.5] and seqs[0].old_logp is None
    kept = PolicyGradient(PolicyLossConfig(name="ppo"), max_response_len=8).sequences(rs, None)
    assert [s.rollout for s in kept] == [0, 3, 4]
    assert masked.normalisers(seqs, 5) == Normaliser(num_tokens=4, num_sequences=2, max_response_len=8)


def test_needs_follow_the_loss_and_the_loss_is_policy_loss_on_policy_rows_in_the_loss():
    assert PolicyGradient(PolicyLossConfig(name="ppo"), max_response_len=8).needs == Needs()
    cfg = PolicyLossConfig(name="gspo", kl_coef=0.1, entropy_coef=0.01)
    objective = PolicyGradient(cfg, max_response_len=8)
    assert objective.needs == Needs(ref=True, entropy=True)
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 0, 0]])
    batch = TokenBatch(logp=-torch.rand(3, 3, generator=g), mask=mask, role=torch.tensor([0, 0, 1]),
                       rollout=torch.tensor([0.0, 1, 0]), reward=torch.ones(3), advantage=torch.tensor([0.5, -1.0, 2.0]),
                       in_loss=torch.tensor([1.0, 0, 1]), old_logp=-torch.rand(3, 3, generator=g),
                       ref_logp=-torch.rand(3, 3, generator=g), entropy=torch.rand(3, 3, generator=g))
    only_row_0 = mask * torch.tensor([1.0, 0, 0])[:, None]
    assert torch.equal(batch.token_mask(Role.POLICY), only_row_0)
    norm = Normaliser.local(only_row_0)
    loss, _ = objective.loss(batch, norm)
    want, _ = policy_loss(batch.logp, batch.old_logp, batch.advantage, only_row_0, cfg, norm,
                          ref_logp=batch.ref_logp, entropy=batch.entropy)
    torch.testing.assert_close(loss, want)
