"""The trainer's log-probs and entropies under context parallelism (CP=2, gloo), and its log-probs of an
engine teacher's top-k ids under tensor parallelism (TP=2), against float64.

Each CP rank holds half of a packed row (zigzag), as logits or as hidden states for the fused
kernels; the values it computes must equal the whole row's, and the gradient shares of the two
ranks must add up to the whole row's gradient (what Megatron's DP x CP gradient all-reduce does). The attention side of CP needs Transformer Engine on
a GPU; this checks everything around it.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import WORKERS, run_torchrun
from tests.workers.cp_logprobs import TEMPERATURE, VOCAB, inputs


def _reference(batch, hidden, out_weight, weights):
    """float64 values ``[n, R]`` and the gradient of the weighted sum on the full hidden states."""
    hidden = hidden.clone().requires_grad_(True)
    logits = hidden @ out_weight.T
    log_p = torch.log_softmax(logits[0, :, :VOCAB] / TEMPERATURE, dim=-1)
    index, mask = batch.response_index, batch.response_mask.double()
    labels = batch.labels[0][index]
    logp = log_p[index].gather(-1, labels[..., None])[..., 0] * mask
    entropy = -(log_p.exp() * log_p).sum(-1)[index] * mask
    ((logp * weights[0]).sum() + (entropy * weights[1]).sum()).backward()
    return logp.detach(), entropy.detach(), hidden.grad


@pytest.mark.dist
def test_cp2_values_and_gradients_match_the_whole_row(tmp_path):
    batch, hidden, out_weight, weights = inputs()
    assert all(length % 4 == 0 for length in batch.lengths)  # every segment splits into 2 * cp chunks
    logp, entropy, grad = _reference(batch, hidden, out_weight, weights)
    run_torchrun(WORKERS / "cp_logprobs.py", 2, [str(tmp_path)], timeout=300)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for kind in ("logits", "hidden"):  # Megatron's logits, or the fused kernels on hidden states
        _check_shares([result[kind] for result in results], batch, logp, entropy, grad)


def _check_shares(shares, batch, logp, entropy, grad):
    for share in shares:
        assert share["local_tokens"] == batch.input_ids.shape[1] // 2
        torch.testing.assert_close(share["logp"].double(), logp, rtol=0, atol=1e-5)
        torch.testing.assert_close(share["entropy"].double(), entropy, rtol=0, atol=1e-5)
        assert share["grad"].abs().sum() > 0
    torch.testing.assert_close((shares[0]["grad"] + shares[1]["grad"]).double(), grad, rtol=0, atol=1e-5)
    # Each rank's share is its own tokens' gradient: the two shares touch disjoint positions.
    touched = [share["grad"][0].abs().sum(-1) > 0 for share in shares]
    assert not (touched[0] & touched[1]).any()


@pytest.mark.dist
def test_tp2_topk_logprobs_and_gradients_match_float64(tmp_path):
    from tests.workers import topk_outputs as w

    batch, hidden, out_weight, weights = w.inputs()
    h = hidden.clone().requires_grad_(True)
    logits = (h @ out_weight.T)[0, :, :w.VOCAB]  # padded columns are not part of the distribution
    log_p = torch.log_softmax(logits / w.DISTILL_T, dim=-1)[batch.response_index]  # [n, R, V]
    mask = batch.response_mask.double()[..., None]
    want = log_p.gather(-1, batch.teacher_topk_ids) * mask
    (want * weights).sum().backward()
    run_torchrun(WORKERS / "topk_outputs.py", 2, [str(tmp_path)], timeout=300)
    rows = w.PADDED_VOCAB // 2
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for kind in ("logits", "hidden"):
            torch.testing.assert_close(result[kind]["topk_logp"].double(), want.detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(result["hidden"]["grad"].double(), h.grad, rtol=0, atol=1e-5)
        columns = _logit_grad(batch, hidden, out_weight, weights, w)[:, rank * rows:(rank + 1) * rows]
        torch.testing.assert_close(result["logits"]["grad"][0].double(), columns, rtol=0, atol=1e-5)


def _logit_grad(batch, hidden, out_weight, weights, w):
    """float64 gradient of ``sum(weights * topk_logp)`` on the padded logits ``[L, PADDED_VOCAB]``."""
    logits = (hidden[0] @ out_weight.T).requires_grad_(True)
    log_p = torch.log_softmax(logits[:, :w.VOCAB] / w.DISTILL_T, dim=-1)[batch.response_index]
    value = log_p.gather(-1, batch.teacher_topk_ids) * batch.response_mask.double()[..., None]
    (value * weights).sum().backward()
    return logits.grad


def test_exact_kd_with_context_parallelism_is_refused_at_config_time():
    from megatron_lcr.distill.depo import DePOConfig
    from megatron_lcr.models.builder import ModelConfig
    from megatron_lcr.parallel.layout import ParallelConfig
    from megatron_lcr.train.rl.config import RLRunConfig

    with pytest.raises(ValueError, match=r"objective 'depo' \(depo.kd_estimator='full'\) needs parallel.cp=1"):
        RLRunConfig(model=ModelConfig(hf_path="model"), parallel=ParallelConfig(context_parallel_size=2),
                    objective="depo", depo=DePOConfig(kd_estimator="full"))


def test_token_budget_must_fit_the_row_layout():
    from megatron_lcr.models.builder import ModelConfig
    from megatron_lcr.parallel.layout import ParallelConfig
    from megatron_lcr.train.rl.config import RLRunConfig, RLTrainerConfig

    with pytest.raises(ValueError, match=r"token_budget \(1002\) must be a multiple of 4"):
        RLRunConfig(model=ModelConfig(hf_path="model"), trainer=RLTrainerConfig(token_budget=1002),
                    parallel=ParallelConfig(tensor_model_parallel_size=4, sequence_parallel=True))
