"""distill/megatron_teacher.py: a frozen Megatron teacher, larger than the student (more layers, a wider
hidden size, the same vocabulary), scores the student's sequences as the Hugging Face teacher model does
(fp32, temperature 1 and 0.7, <= 1e-4) and as an engine teacher (``lcr serve``) serving the same weights
does; its hidden states at the response positions times its output weight give those log-probs again.

The Megatron side runs in a one-process torchrun (Megatron's CPU compat layer stays out of the pytest
process): this file is its own worker (``__main__`` below).
"""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

from megatron_lcr.rl.sequences import TokenSequence

SEQS = [TokenSequence([5, 17, 33, 48], [71, 99, 120]), TokenSequence([9, 8, 7], [6, 999]),
        TokenSequence([300, 301, 302, 303, 304, 305], [400, 401, 402, 403])]
TOKEN_BUDGET = 12  # two micro-batches, one of them packing two sequences
VOCAB = 1000
HIDDEN = 96  # the student's (tests.tiny_hf) is 64


def make_wide_teacher(out_dir: pathlib.Path, *, seed: int = 5, num_layers: int = 3) -> pathlib.Path:
    """A tiny Llama like ``make_tiny_hf``'s (same tokenizer and vocabulary) but 96 wide with 12-wide heads."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.tiny_hf import save_tiny_tokenizer, tiny_config

    cfg = LlamaConfig(**{**tiny_config("llama", num_layers=num_layers).to_dict(), "hidden_size": HIDDEN,
                         "intermediate_size": 160, "head_dim": HIDDEN // 8})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():
            for param in model.parameters():  # as make_tiny_hf: norms away from 1, matrices noisier
                param.add_(torch.randn_like(param) * (0.02 if param.dim() > 1 else 0.1))
    model.save_pretrained(str(out_dir), safe_serialization=True)
    save_tiny_tokenizer(out_dir)
    return out_dir


@torch.no_grad()
def hf_scores(model_dir, temperature: float) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager",
                                                 local_files_only=True).eval()
    out = []
    for seq in SEQS:
        ids = seq.prompt + seq.response
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double() / temperature, dim=-1)
        out.append(torch.stack([logp[j - 1, ids[j]] for j in range(len(seq.prompt), len(ids))]))
    return out


def max_diff(got, want: list[torch.Tensor]) -> float:
    assert [len(g) for g in got] == [len(w) for w in want]
    return max((torch.as_tensor(g, dtype=torch.float64) - w).abs().max().item() for g, w in zip(got, want))


@pytest.fixture(scope="module")
def megatron_results(tmp_path_factory):
    from tests.distributed import run_torchrun

    root = tmp_path_factory.mktemp("megatron_teacher")
    teacher = make_wide_teacher(root / "teacher")
    run_torchrun(__file__, 1, [str(teacher), str(root / "out.pt")], timeout=600)
    return teacher, torch.load(root / "out.pt")


@pytest.fixture()
def world_of_one():
    from megatron_lcr.parallel.env import free_port

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_scores_equal_the_hugging_face_teachers(megatron_results, temperature):
    teacher, out = megatron_results
    want = hf_scores(teacher, temperature)
    assert max_diff(out["scores"][temperature], want) <= 1e-4
    # The two temperatures differ by far more than the tolerance: the spec's temperature is applied.
    assert max_diff(out["scores"][temperature], hf_scores(teacher, {1.0: 0.7, 0.7: 1.0}[temperature])) > 1e-2


@pytest.mark.dist
def test_hidden_states_times_the_output_weight_give_the_scores(megatron_results):
    teacher, out = megatron_results
    weight = out["weight"].double()
    assert weight.shape[1] == HIDDEN and weight.shape[0] >= VOCAB
    seen = set()
    for temperature in (1.0, 0.7):
        want = hf_scores(teacher, temperature)
        for batch in out["batches"]:
            hidden = batch["hidden"].double()
            assert hidden.shape == (len(batch["sequence_ids"]), batch["mask"].shape[1], HIDDEN)
            for k, j in enumerate(batch["sequence_ids"]):
                response = SEQS[j].response
                assert batch["mask"][k].sum().item() == len(response)
                logp = torch.log_softmax(hidden[k, :len(response)] @ weight[:VOCAB].T / temperature, dim=-1)
                got = logp.gather(-1, torch.tensor(response)[:, None])[:, 0]
                assert (got - want[j]).abs().max().item() <= 1e-4
                seen.add(j)
    assert seen == set(range(len(SEQS))) and len(out["batches"]) == 2


@pytest.mark.dist
def test_a_second_distillation_temperature_scores_the_same_tokens_at_it(megatron_results):
    teacher, out = megatron_results
    scores = out["two_temperatures"]
    for name, temperature in (("logp", 0.7), ("distill_logp", 1.0)):
        assert max_diff([scores[j][name] for j in range(len(SEQS))], hf_scores(teacher, temperature)) <= 1e-4


@pytest.mark.dist
def test_a_student_with_another_padded_vocabulary_is_refused(megatron_results):
    _, out = megatron_results
    assert "differs from the student's" in out["refused"] and "\n" not in out["refused"]


@pytest.mark.dist
def test_scores_equal_an_engine_teacher_on_the_same_weights(megatron_results, tmp_path, world_of_one):
    from megatron_lcr.distill.teacher import EngineTeacher, EngineTeacherConfig
    from megatron_lcr.rollout.sglang import SGLangLaunchConfig

    teacher, out = megatron_results
    server = SGLangLaunchConfig(backend="reference", base_port=0, dtype="float32", model_path=str(teacher),
                                startup_timeout_s=300)
    with EngineTeacher(EngineTeacherConfig(server=server), student_dir=str(teacher), log_dir=str(tmp_path)) as engine:
        engine_scores = engine.score(SEQS)
    assert max_diff(out["scores"][1.0], [torch.tensor(s, dtype=torch.float64) for s in engine_scores]) <= 1e-4


# --------------------------------------------------------------------------- the torchrun worker


def main(teacher_dir: str, out_path: str) -> None:
    from megatron_lcr.distill.megatron_teacher import MegatronTeacher
    from megatron_lcr.models.builder import ModelConfig
    from megatron_lcr.parallel.layout import ParallelConfig
    from megatron_lcr.parallel.state import destroy_megatron, initialize_megatron
    from megatron_lcr.train.micro_batches import plan_micro_batches
    from megatron_lcr.train.token_logprobs import ScoringSpec, score_sequences

    parallel = ParallelConfig()
    initialize_megatron(parallel, seed=1)
    model = ModelConfig(hf_path=teacher_dir, params_dtype="float32", transformer_impl="local")
    out = {"scores": {}}
    for temperature, from_hidden in ((1.0, False), (0.7, True)):  # Megatron's logits, and the fused kernels
        spec = ScoringSpec(vocab_size=VOCAB, temperature=temperature, from_hidden=from_hidden)
        teacher = MegatronTeacher(model, parallel, spec, load=None, token_budget=TOKEN_BUDGET)
        out["scores"][temperature] = teacher.score(SEQS)
    batches = plan_micro_batches(SEQS, token_budget=TOKEN_BUDGET, dp_size=1, dp_rank=0, pad_id=0, fixed_length=False)
    out["batches"] = [{"hidden": b.teacher_hidden, "mask": b.response_mask, "sequence_ids": b.sequence_ids}
                      for b in teacher.attach_hidden(batches)]
    out["weight"] = teacher.output_weight.detach().clone()
    two = ScoringSpec(vocab_size=VOCAB, temperature=0.7, from_hidden=True, distill_temperature=1.0)
    out["two_temperatures"] = score_sequences(teacher.model.chunks, batches, two)
    try:
        MegatronTeacher(model, parallel, spec, load=None, token_budget=TOKEN_BUDGET,
                        student_padded_vocab=out["weight"].shape[0] + 128)
        out["refused"] = ""
    except ValueError as err:
        out["refused"] = str(err)
    torch.save(out, out_path)
    destroy_megatron()


if __name__ == "__main__":
    main(*sys.argv[1:])
