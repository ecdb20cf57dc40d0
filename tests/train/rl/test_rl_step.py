"""The RL update on Megatron (gloo): packing- and DP-invariant, NaN-guarded; and the packed layout itself.

- ``pack_micro_batch``: row layout, labels, response positions and the block-diagonal causal mask,
  against hand-written tensors.
- One ``guarded_update`` (GRPO + DePO-KD terms, sampled and exact KD) gives the same global loss and
  gradient norm with token budgets 4096 and 200 (1 vs several micro-batches), with DP=1, DP=2 and
  TP=2, and with the kernels' Triton implementation (interpreted on CPU) instead of the torch one:
  the normalisers are global and the scaling undoes Megatron's per-micro-batch and DDP averaging.
  (Sequence parallelism cannot run here: Megatron's local-spec norms refuse it without Transformer
  Engine; its row padding is checked by hand below.)
  The exact KD term equals the float64 KL between the Hugging Face model's own distributions on the
  short and the long context.
- A NaN loss on one micro-batch: the step is skipped, weights and LR schedule stay where they were.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_lcr.train.micro_batches import PackLayout, TokenSequence, pack_micro_batch, plan_micro_batches
from tests.distributed import WORKERS, run_torchrun
from tests.tiny_hf import make_tiny_hf
from tests.workers.rl_update import TEMPERATURE, sequences


def test_packed_row_layout_and_mask():
    seqs = [TokenSequence([5, 6, 7], [8, 9], token_values={"old_logp": [-1.0, -2.0]}, values={"px": 1.0}),
            TokenSequence([1, 2], [3], values={"px": 0.0})]
    batch = pack_micro_batch(seqs, [0, 1], pad_id=0, pad_to=10)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1]]
    assert batch.lengths == [5, 3, 2]
    # Position 2 (token 7) predicts 8, position 3 predicts 9, position 6 (token 2) predicts 3.
    assert batch.labels.tolist() == [[0, 0, 8, 9, 0, 0, 3, 0, 0, 0]]
    assert batch.response_index.tolist() == [[2, 3], [6, 0]]
    assert batch.response_mask.tolist() == [[1.0, 1.0], [1.0, 0.0]]
    assert batch.token_values["old_logp"].tolist() == [[-1.0, -2.0], [0.0, 0.0]]
    assert batch.values["px"].tolist() == [1.0, 0.0]
    mask, packed = batch.attention_inputs(torch.device("cpu"), thd=False)
    assert packed is None
    allowed = ~mask[0, 0]
    expected = torch.zeros(10, 10, dtype=torch.bool)
    for start, length in ((0, 5), (5, 3), (8, 2)):
        expected[start:start + length, start:start + length] = torch.ones(length, length, dtype=torch.bool).tril()
    assert torch.equal(allowed, expected)


def test_segments_padded_for_context_parallelism():
    seqs = [TokenSequence([5, 6, 7], [8, 9]), TokenSequence([1, 2], [3])]
    cp2 = PackLayout.for_layout(tp=1, cp=2, sequence_parallel=False)
    batch = pack_micro_batch(seqs, [0, 1], pad_id=0, pad_to=0, layout=cp2)
    assert batch.lengths == [8, 4]  # 5 -> 8 and 3 -> 4 tokens: each splits into 2 * cp = 4 chunks
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 0, 0, 0, 1, 2, 3, 0]]
    assert batch.labels.tolist() == [[0, 0, 8, 9, 0, 0, 0, 0, 0, 3, 0, 0]]
    assert batch.response_index.tolist() == [[2, 3], [9, 0]]
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_micro_batch(seqs, [0, 1], pad_id=0, pad_to=10, layout=cp2)
    # Sequence parallelism with TP=2 and CP=2: rows are a multiple of lcm(2 * cp, cp * tp) = 4 ...
    assert PackLayout.for_layout(tp=2, cp=2, sequence_parallel=True) == PackLayout(4, 4)
    # ... and with TP=4, CP=1 a multiple of 4 while segments are not padded: 5 + 3 -> 8, 5 -> 8.
    sp4 = PackLayout.for_layout(tp=4, cp=1, sequence_parallel=True)
    assert pack_micro_batch(seqs, [0, 1], pad_id=0, pad_to=0, layout=sp4).lengths == [5, 3]
    assert pack_micro_batch(seqs, [0], pad_id=0, pad_to=0, layout=sp4).lengths == [5, 3]


def test_units_share_a_micro_batch():
    seqs = [TokenSequence([1] * 30, [2]), TokenSequence([1] * 5, [2]), TokenSequence([1] * 30, [2]),
            TokenSequence([1] * 5, [2])]
    alone = plan_micro_batches(seqs, token_budget=70, dp_size=1, dp_rank=0, pad_id=0, fixed_length=False)
    assert sorted(b.sequence_ids for b in alone) == [[0, 2, 1], [3]]  # first-fit-decreasing splits 1 from 3
    batches = plan_micro_batches(seqs, token_budget=70, dp_size=1, dp_rank=0, pad_id=0, fixed_length=False,
                                 units=[[0, 2], [1, 3]])
    assert sorted(b.sequence_ids for b in batches) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match=r"have 62 tokens together, more than token_budget \(40\)"):
        plan_micro_batches(seqs, token_budget=40, dp_size=1, dp_rank=0, pad_id=0, fixed_length=False,
                           units=[[0, 2], [1, 3]])
    with pytest.raises(ValueError, match="partition"):
        plan_micro_batches(seqs, token_budget=80, dp_size=1, dp_rank=0, pad_id=0, fixed_length=False, units=[[0, 1]])


def test_interleaved_pipeline_gets_a_multiple_of_pp_micro_batches():
    layout = PackLayout.for_layout(tp=1, cp=1, sequence_parallel=False, pp=4, vpp=2)
    assert layout == PackLayout(1, 1, 4) and PackLayout.for_layout(1, 1, False, pp=4).count_multiple == 1
    seqs = [TokenSequence([1] * 20, [2]) for _ in range(5)]
    batches = plan_micro_batches(seqs, token_budget=45, dp_size=1, dp_rank=0, pad_id=0, fixed_length=True,
                                 layout=layout)
    assert len(batches) == 4  # 5 sequences of 21 tokens fit in 3 rows of 45; the schedule needs 4
    assert sorted(i for b in batches for i in b.sequence_ids) == [0, 1, 2, 3, 4]
    assert all(b.input_ids.shape == (1, 45) for b in batches)


def test_empty_micro_batch_is_padding_only():
    batch = pack_micro_batch([], [], pad_id=0, pad_to=4)
    assert batch.input_ids.tolist() == [[0, 0, 0, 0]] and batch.lengths == [4]
    assert batch.response_mask.sum() == 0


@pytest.mark.dist
def test_update_is_invariant_to_packing_and_dp_and_skips_nan(tmp_path, monkeypatch):
    model = make_tiny_hf("llama", tmp_path / "llama", num_layers=2)
    runs = {}
    for name, nproc, tp, impl in (("dp1", 1, 1, "torch"), ("dp2", 2, 1, "torch"), ("tp2", 2, 2, "torch"),
                                  ("dp1-triton", 1, 1, "triton")):
        out = tmp_path / f"{name}.json"
        if impl == "triton":  # the Triton kernels on CPU: the interpreter, read when they are defined
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        run_torchrun(WORKERS / "rl_update.py", nproc, [str(model), str(out), str(tp), impl])
        runs[name] = json.loads(out.read_text())
        assert (runs[name]["dp"], runs[name]["tp"]) == (nproc // tp, tp)
    for estimator in ("sampled", "full"):
        assert runs["dp1"]["runs"][f"{estimator}/4096"]["micro_batches"] == 1
        assert runs["dp1"]["runs"][f"{estimator}/200"]["micro_batches"] > 2
    assert runs["dp1"]["runs"]["full/4096"]["depo/kd_loss"] == pytest.approx(_exact_kd_reference(model), rel=1e-5)
    for name, result in runs.items():
        for key, got in result["runs"].items():
            reference = runs["dp1"]["runs"][key.split("/")[0] + "/4096"]
            assert reference["skipped"] == 0.0 and reference["grad_norm"] > 0
            assert got["loss"] == pytest.approx(reference["loss"], rel=1e-5, abs=1e-7), (name, key)
            assert got["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5), (name, key)
            assert got["depo/kd_loss"] == pytest.approx(reference["depo/kd_loss"], rel=1e-5, abs=1e-7)
        assert result["runs"]["full/4096"]["loss"] != pytest.approx(result["runs"]["sampled/4096"]["loss"])
        nan = result["nan_step"]
        assert nan["skipped"] == 1.0 and nan["weights_unchanged"] and nan["lr_unchanged"]
        assert nan["scheduler_steps"] == 1  # only the good update moved the schedule


def _exact_kd_reference(model_dir) -> float:
    """Token mean over the long rows of KL(p_short || p_long) at TEMPERATURE, float64, from HF logits."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()

    def response_log_probs(prompt, response):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + response])).logits[0]
        return torch.log_softmax(logits[len(prompt) - 1:len(prompt) + len(response) - 1] / TEMPERATURE, dim=-1)

    seqs = sequences(full_kd=True)
    total, count = 0.0, 0
    for short, long in zip(seqs, seqs[1:]):
        if long.values["aux"]:
            log_p = response_log_probs(short.prompt, short.response)
            log_q = response_log_probs(long.prompt, long.response)
            total += float((log_p.exp() * (log_p - log_q)).sum())
            count += len(long.response)
    return total / count


@pytest.mark.dist
def test_fp16_update_scales_the_loss_as_the_optimizer_unscales_the_gradients(tmp_path):
    """fp16 through Megatron's loss scaler: the loss is multiplied by the scale before backward
    (``grad_scale_func``) and the gradients divided by it, so the gradient norm is fp32's (fp16
    rounding aside); unwired, it would come out 2^16 times smaller."""
    model = make_tiny_hf("llama", tmp_path / "llama", num_layers=2)
    out = tmp_path / "fp16.json"
    run_torchrun(WORKERS / "fp16_update.py", 1, [str(model), str(out)])
    runs = json.loads(out.read_text())
    fp32, fp16 = runs["float32"], runs["float16"]
    assert fp32["skipped"] == 0.0 and "loss_scale" not in fp32
    assert (fp16["skipped"], fp16["overflow"], fp16["loss_scale"]) == (0.0, 0.0, 2.0**16)
    assert fp16["loss"] == pytest.approx(fp32["loss"], rel=2e-2, abs=1e-3)
    assert fp16["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=5e-2)


def test_non_finite_weights_stop_the_step_before_the_sync():
    """check_weights_finite: NaN/inf weights after an update raise, naming the step and the tensor."""
    import torch.distributed as dist

    from megatron_lcr.train.rl.step import check_weights_finite

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        chunk = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
        check_weights_finite([chunk], step=3)
        with torch.no_grad():
            chunk[1].weight[0, 0] = float("inf")
        with pytest.raises(FloatingPointError, match=r"^step 3: .* on 1 rank\(s\) \(rank 0: 1.weight\); not syncing"):
            check_weights_finite([chunk], step=3)
    finally:
        dist.destroy_process_group()
