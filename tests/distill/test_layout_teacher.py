"""distill/layout_teacher.py: a Megatron teacher with a tensor-parallel layout of its own inside the job.

Three 2-rank jobs (gloo): the student at TP=1 x DP=2 with the teacher at TP=2 (one teacher split over both
ranks, which hold different micro-batches), the student at TP=2 with the teacher at TP=1 (a whole teacher
per rank, its output weight cut to the student's vocabulary shards), and the student at TP=1 x DP=2 with
the teacher at PP=2 (its stages on the two ranks, activations sent from one to the other). The teacher is wider than the
student (hidden 96 vs 64). Against float64 / Hugging Face: its hidden states at the response positions
equal HF's final hidden states, its scores equal HF's log-probs (<= 1e-4), and the exact reverse KL from
the student's fused kernel with the teacher's hidden states and weight rows equals float64 PyTorch on the
full vocabulary (<= 1e-5). The worker is this file (``__main__``)."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.distill.test_megatron_teacher import SEQS, VOCAB, hf_scores, make_wide_teacher, max_diff

STUDENT_HIDDEN, TEMPERATURE, TOKEN_BUDGET = 64, 0.7, 12


def student_head(padded: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random student output weight ``[padded, 64]`` and hidden rows per sequence (the same on every rank)."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(padded, STUDENT_HIDDEN, generator=g) / STUDENT_HIDDEN**0.5 * 2
    hidden = [torch.randn(len(s.response), STUDENT_HIDDEN, generator=g) for s in SEQS]
    return weight, hidden


@torch.no_grad()
def hf_hidden(model_dir) -> tuple[list[torch.Tensor], torch.Tensor]:
    """HF's final hidden states at the positions predicting each response token, and its output weight."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    out = []
    for seq in SEQS:
        ids = seq.prompt + seq.response
        states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        out.append(states[len(seq.prompt) - 1:len(ids) - 1].double())
    return out, model.lm_head.weight.double()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_wide_teacher(tmp_path_factory.mktemp("layout_teacher") / "teacher", num_layers=4)  # 2 stages of 2


@pytest.mark.dist
@pytest.mark.parametrize("student_tp, teacher_tp, teacher_pp", [(1, 2, 1), (2, 1, 1), (1, 1, 2)])
def test_teacher_with_its_own_layout_matches_hf_and_float64(teacher_dir, tmp_path, student_tp, teacher_tp, teacher_pp):
    from tests.distributed import run_torchrun

    run_torchrun(__file__, 2, [str(teacher_dir), str(tmp_path), student_tp, teacher_tp, teacher_pp], timeout=600)
    want_scores = hf_scores(teacher_dir, TEMPERATURE)
    want_hidden, lm_head = hf_hidden(teacher_dir)
    seen = set()
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert max_diff(out["scores"], want_scores) <= 1e-4
        s_weight, s_hidden = student_head(out["student_padded"])
        for j, hidden, kl in out["rows"]:
            seen.add(j)
            assert (hidden.double() - want_hidden[j]).abs().max().item() <= 1e-4
            # float64 reverse KL(student || teacher) over the real vocabulary at the distillation temperature
            log_s = torch.log_softmax(s_hidden[j].double() @ s_weight[:VOCAB].double().T / TEMPERATURE, -1)
            log_t = torch.log_softmax(want_hidden[j] @ lm_head.T / TEMPERATURE, -1)
            want = (log_s.exp() * (log_s - log_t)).sum(-1)
            assert (kl.double() - want).abs().max().item() <= 1e-5, (rank, j)
    assert seen == set(range(len(SEQS)))


@pytest.mark.e2e
def test_lcr_train_with_the_teacher_on_its_own_groups_gives_the_same_step(tmp_path):
    """``lcr train examples/tiny/opd.yaml`` (the exact KL) with the teacher on the student's layout and on its
    own groups (TP=1 here: one CPU process) computes the same loss and KL, to the last bit."""
    import json
    import subprocess

    from tests.distributed import REPO_ROOT

    kl = {}
    for name, extra in (("shared", []), ("own", ["distill.teacher.tensor_parallel_size=1"])):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "megatron_lcr.cli", "train", "examples/tiny/opd.yaml", "--out", str(out),
               "trainer.steps=1", "trainer.prompts_per_step=4", "data.num_eval=4", *extra]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (step,) = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "opd/kl" in m]
        kl[name] = (step["opd/kl"], step["loss"])
        announced = "on its own layout: TP=1 PP=1, 1 group(s) of 1 consecutive rank(s)" in proc.stderr
        assert announced == (name == "own"), name  # the run used the teacher it was asked for
    assert kl["own"] == kl["shared"] and kl["own"][0] > 0.1


# --------------------------------------------------------------------------- the torchrun worker


def main(teacher_dir: str, out_dir: str, student_tp: str, teacher_tp: str, teacher_pp: str) -> None:
    from megatron.core import parallel_state as ps

    from megatron_lcr.distill.layout_teacher import LayoutTeacher
    from megatron_lcr.kernels import kl_divergence
    from megatron_lcr.models.builder import ModelConfig, padded_vocab_size
    from megatron_lcr.parallel.layout import ParallelConfig
    from megatron_lcr.parallel.state import destroy_megatron, initialize_megatron
    from megatron_lcr.train.micro_batches import plan_micro_batches

    tp = int(student_tp)
    initialize_megatron(ParallelConfig(tensor_model_parallel_size=tp), seed=1)
    padded = padded_vocab_size(VOCAB, tp)
    model = ModelConfig(hf_path=teacher_dir, params_dtype="float32", transformer_impl="local")
    own = ParallelConfig(tensor_model_parallel_size=int(teacher_tp), pipeline_model_parallel_size=int(teacher_pp))
    teacher = LayoutTeacher(model, own, vocab_size=VOCAB, temperature=TEMPERATURE,
                            token_budget=TOKEN_BUDGET, student_padded_vocab=padded)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    batches = plan_micro_batches(SEQS, token_budget=TOKEN_BUDGET, dp_size=dp, dp_rank=dp_rank, pad_id=0,
                                 fixed_length=False)
    s_weight, s_hidden = student_head(padded)
    local = padded // tp
    start = ps.get_tensor_model_parallel_rank() * local
    group = ps.get_tensor_model_parallel_group() if tp > 1 else None
    rows = []
    for batch in teacher.attach_hidden(batches):
        for k, j in enumerate(batch.sequence_ids):
            n = len(SEQS[j].response)
            t_hidden = batch.teacher_hidden[k, :n]
            kl = kl_divergence(s_hidden[j], s_weight[start:start + local], t_hidden, teacher.output_weight,
                               kind="reverse", temperature=TEMPERATURE, vocab_start=start, valid_vocab_end=VOCAB,
                               tp_group=group)
            rows.append((j, t_hidden.clone(), kl.detach()))
    out = {"scores": teacher.score(SEQS), "rows": rows, "student_padded": padded}
    torch.save(out, f"{out_dir}/rank{torch.distributed.get_rank()}.pt")
    destroy_megatron()


if __name__ == "__main__":
    main(*sys.argv[1:])
