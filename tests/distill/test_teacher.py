"""distill/teacher.py: an engine teacher (a real ``lcr serve`` with the teacher model) scores the
student's sequences exactly as the teacher model does (Hugging Face fp32, <= 1e-4), its top-k tokens
included; a teacher with
another vocabulary or tokenizer, an unreachable teacher and a temperature other than 1 are refused in
one line before any work."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_lcr.distill.teacher import EngineTeacher, EngineTeacherConfig, check_same_tokenizer
from megatron_lcr.parallel.env import free_port
from megatron_lcr.rl.sequences import TokenSequence
from megatron_lcr.rollout.client import RolloutRequestError
from megatron_lcr.rollout.sglang import SGLangLaunchConfig
from tests.tiny_hf import make_tiny_hf


@pytest.fixture()
def world_of_one():
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


@torch.no_grad()
def hf_response_logprobs(model_dir, seq: TokenSequence) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    ids = seq.prompt + seq.response
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return [float(logp[j - 1, ids[j]]) for j in range(len(seq.prompt), len(ids))]


@torch.no_grad()
def hf_response_topk(model_dir, seq: TokenSequence, k: int) -> tuple[list[list[int]], list[list[float]]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    ids = seq.prompt + seq.response
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    top = torch.topk(logp[len(seq.prompt) - 1:len(ids) - 1], k)
    return top.indices.tolist(), top.values.tolist()


def test_engine_teacher_scores_equal_the_teacher_models(tmp_path, world_of_one):
    student = make_tiny_hf("llama", tmp_path / "student", seed=0, num_layers=2)
    teacher = make_tiny_hf("llama", tmp_path / "teacher", seed=5, num_layers=4)  # bigger, same tokenizer
    server = SGLangLaunchConfig(backend="reference", base_port=0, dtype="float32", model_path=str(teacher),
                                api_key="teacher-key", startup_timeout_s=300)
    seqs = [TokenSequence([5, 17, 33, 48], [71, 99, 120]), TokenSequence([9, 8, 7], [6, 999])]
    with EngineTeacher(EngineTeacherConfig(server=server), student_dir=str(student), log_dir=str(tmp_path)) as t:
        scores = t.score(seqs)
        top = t.score_topk(seqs, 3)
    for seq, got, (logp, ids, top_logp) in zip(seqs, scores, top):
        want = hf_response_logprobs(teacher, seq)
        assert len(got) == len(seq.response) and max(abs(a - b) for a, b in zip(got, want)) <= 1e-4
        assert logp == got
        want_ids, want_top = hf_response_topk(teacher, seq, 3)  # the teacher's top 3 at each response position
        assert ids == want_ids
        assert max(abs(a - b) for row, ref in zip(top_logp, want_top) for a, b in zip(row, ref)) <= 1e-4
    student_scores = hf_response_logprobs(student, seqs[0])  # the check tells the two models apart
    assert max(abs(a - b) for a, b in zip(scores[0], student_scores)) > 1e-2


def test_a_teacher_with_another_vocabulary_or_tokenizer_is_refused(tmp_path):
    student = make_tiny_hf("llama", tmp_path / "student", num_layers=2)
    other = tmp_path / "other"
    shutil.copytree(student, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))
    with pytest.raises(ValueError, match=r"^teacher .*other has vocab_size \d+, the student .*student \d+: "):
        check_same_tokenizer(other, student)
    (other / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    (other / "tokenizer.json").write_text(json.dumps(tokenizer, indent=1) + "\n")  # same vocab size, other file
    with pytest.raises(ValueError, match=r"different tokenizers \(tokenizer.json\)"):
        check_same_tokenizer(other, student)
    check_same_tokenizer(student, student)


def test_unreachable_teacher_and_unscaled_temperature_are_refused(tmp_path, world_of_one):
    student = make_tiny_hf("llama", tmp_path / "student", num_layers=2)
    with pytest.raises(ValueError, match="engine teachers score at temperature 1 only"):
        EngineTeacherConfig(urls=["http://127.0.0.1:9"], temperature=0.7)
    with pytest.raises(ValueError, match="needs server.model_path"):
        EngineTeacher(EngineTeacherConfig(), student_dir=str(student), log_dir=str(tmp_path))
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RolloutRequestError, match=url.replace(".", r"\.")) as err:
        EngineTeacher(EngineTeacherConfig(urls=[url], request_timeout_s=5), student_dir=str(student),
                      log_dir=str(tmp_path))
    assert "\n" not in str(err.value)
