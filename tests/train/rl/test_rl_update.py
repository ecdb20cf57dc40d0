"""train/rl/update.py: the guarded RL update on Megatron (gloo), packing- and DP-invariant, NaN-guarded.

- One ``guarded_update`` (GRPO + DePO-KD terms, sampled and exact KD) gives the same global loss and
  gradient norm with token budgets 4096 and 200 (1 vs several micro-batches), with DP=1, DP=2 and
  TP=2, and with the kernels' Triton implementation (interpreted on CPU) instead of the torch one:
  the normalisers are global and the scaling undoes Megatron's per-micro-batch and DDP averaging.
  (Sequence parallelism cannot run here: Megatron's local-spec norms refuse it without Transformer
  Engine; its row padding is checked in test_micro_batches.py.)
  The exact KD term equals the float64 KL between the Hugging Face model's own distributions on the
  short and the long context.
- A NaN loss on one micro-batch: the step is skipped, weights and LR schedule stay where they were.
- fp16: the loss is scaled as Megatron's optimizer unscales the gradients; non-finite weights after
  an update stop the step before the sync.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_lcr.rl.sequences import Role
from tests.distributed import WORKERS, run_torchrun
from tests.tiny_hf import make_tiny_hf
from tests.workers.rl_update import TEMPERATURE, sequences


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
        if long.role == Role.LONG_CONTEXT:
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

    from megatron_lcr.train.rl.update import check_weights_finite

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
