"""``lcr train`` (RL + DePO) end to end on CPU with real reference servers, resume, and bad input.

- Three steps of GRPO + DePO-KD on a tiny random Llama: every trainable parameter changes (the
  exported checkpoint vs the starting weights), the trainer's log-probs equal the engine's at every
  step (fp32, <= 1e-4: the engines hold exactly the trainer's weights and sample at the same
  temperature), the engines' weight version follows the step, and results.json holds base and
  trained EM on both contexts.
- SIGKILL after a checkpoint, then the same command again: it resumes and its metrics equal an
  uninterrupted run's, step for step.
- The global-batch loss and gradient norm do not depend on how the batch is packed into
  micro-batches (token budget).
- Every objective (plain RL with CISPO, DePO-IW, DePO's exact KD over two mini-batches) runs two
  clean steps through the loop.
- Bad input (unknown key, empty dataset, unknown reward, GRPO group of 1, a loss that contradicts its
  algorithm, mini-batches that do not divide the rollouts, an unknown objective) fails in one line
  before any work starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.distributed import REPO_ROOT
from tests.train.test_pretrain import error_lines, lcr

pytestmark = pytest.mark.e2e

DATA = {
    "num_eval": 8,
    "longblocks": {"num_samples": 64, "short_tokens": 96, "long_tokens": 200, "tolerance": 0.25,
                   "families": ["multihop"], "max_hops": 1, "max_fillers": 1},
}
CONFIG = {
    "model": {"params_dtype": "float32"},
    "optimizer": {"lr": 1.0e-3, "warmup_steps": 0, "decay_style": "constant", "weight_decay": 0.0, "clip_grad": 1.0},
    "trainer": {"steps": 3, "prompts_per_step": 4, "token_budget": 512, "seed": 7, "tensorboard": False},
    "data": DATA,
    "prompt": {"instruction": 'Answer from the documents. End with "Answer:" and the answer.'},
    "rl": {"group_size": 2, "max_new_tokens": 6, "temperature": 1.0},
    # tau 0 keeps every rollout for KD: a random model earns no reward, so KD is what moves it.
    "objective": "depo",
    "depo": {"tau": 0.0},
    "eval": {"max_new_tokens": 6},
}


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory) -> Path:
    """A random 2-layer Llama with the shipped tiny tokenizer (vocabulary 1075)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_lcr.data.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

    out = tmp_path_factory.mktemp("rl") / "policy"
    tokenizer = load_tokenizer(None)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    assert (Path(TINY_TOKENIZER_DIR) / "tokenizer.json").is_file()
    return out


def write_config(path: Path, policy: Path, **sections) -> Path:
    cfg = json.loads(json.dumps(CONFIG))
    cfg["model"]["hf_path"] = str(policy)
    for name, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(name, {}).update(values)
        else:
            cfg[name] = values
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_three_steps_move_every_parameter_and_match_engine_logprobs(tmp_path, tiny_policy):
    out = tmp_path / "run"
    proc = lcr("train", str(write_config(tmp_path / "c.yaml", tiny_policy)), "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for which in ("base", "trained"):
        assert set(results[which]) >= {"short_em", "long_em"}
        assert all(0.0 <= results[which][k] <= 100.0 for k in ("short_em", "long_em"))
    assert results["wall_seconds"] > 0
    steps = [m for m in metrics(out) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        assert m["skipped"] == 0.0
        assert m["rollout/logp_diff_max"] <= 1e-4, m
        assert m["depo/kept_frac"] > 0 and m["sync/bytes"] > 0
    # Every trainable tensor moved: export the final checkpoint and compare with the start.
    hf = tmp_path / "hf"
    proc = lcr("convert", "megatron-to-hf", "--ckpt", results["checkpoint"], "--out", str(hf))
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = load_file(tiny_policy / "model.safetensors"), load_file(hf / "model.safetensors")
    assert before.keys() == after.keys()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == []


def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(tmp_path, tiny_policy):
    cfg = write_config(tmp_path / "c.yaml", tiny_policy, trainer={"steps": 4, "save_interval": 2})
    reference = tmp_path / "reference"
    proc = lcr("train", str(cfg), "--out", str(reference), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "killed"
    script = Path(sys.executable).with_name("lcr")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    job = subprocess.Popen([str(script), "train", str(cfg), "--out", str(out)], cwd=REPO_ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = out / "checkpoints" / "iter_0000002" / "trainer_state.json"
    deadline = time.monotonic() + 600
    while not state.is_file() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state.is_file(), "the run never wrote its step-2 checkpoint"
    os.killpg(job.pid, signal.SIGKILL)  # the trainer and its rollout servers, no clean-up
    job.wait()
    assert not (out / "results.json").exists()

    proc = lcr("train", str(cfg), "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def comparable(rows):
        # Wall times differ, and so does the engine side of the log-prob check at the 1e-7 level: the
        # server batches requests as they arrive, and fp32 matmuls of other batch shapes round
        # differently. Every training number (rewards, losses, grad norms, EM) must be identical.
        drop = ("time/", "sync/seconds", "rollout/logp_diff")
        return [{k: v for k, v in row.items() if not k.startswith(drop)} for row in rows]

    assert comparable(metrics(out)) == comparable(metrics(reference))
    assert json.loads((out / "results.json").read_text())["trained"] == \
        json.loads((reference / "results.json").read_text())["trained"]


@pytest.mark.parametrize("sections, expected", [
    ({"objective": "rl", "rl": {"algorithm": "cispo"}}, {"pg_loss", "clip_high_frac"}),
    ({"objective": "depo-iw", "depo": {"importance": "sequence"}}, {"depo/iw_pg_loss", "depo/iw_ratio_mean"}),
    ({"depo": {"tau": 0.0, "kd_estimator": "full"}, "trainer": {"steps": 2, "mini_batches": 2}},
     {"depo/kd_loss", "train/updates"}),
], ids=["cispo", "depo-iw", "exact-kd-2-mini-batches"])
def test_every_objective_trains_through_lcr_train(tmp_path, tiny_policy, sections, expected):
    """Each objective (and a loss, and mini-batches) through the whole loop: two clean steps whose
    trainer log-probs match the engine's, with the objective's own metrics and no others'."""
    out = tmp_path / "run"
    sections = {"trainer": {"steps": 2}, **sections}
    proc = lcr("train", str(write_config(tmp_path / "c.yaml", tiny_policy, **sections)), "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [m for m in metrics(out) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert m["skipped"] == 0.0 and m["rollout/logp_diff_max"] <= 1e-4 and expected <= set(m), m
        assert all(v == v for v in m.values())  # no NaN
        assert ("depo/kd_loss" in m) == ("depo/kd_loss" in expected)
    if "train/updates" in expected:
        assert all(m["train/updates"] == 2 for m in steps)
    resolved = yaml.safe_load((out / "config.yaml").read_text())  # the loss that ran is the one asked for
    assert resolved["rl"]["loss"]["name"] == ("cispo" if sections.get("rl", {}).get("algorithm") == "cispo" else "ppo")


@pytest.mark.parametrize("section, value, message", [
    ("trainer", {"stepz": 3}, "trainer.stepz"),
    ("rl", {"reward": "bleu"}, "unknown reward 'bleu'"),
    ("rl", {"group_size": 1}, "group_size must be >= 2"),
    ("rl", {"algorithm": "gspo", "loss": {"name": "ppo"}},
     "rl.loss.name='ppo' conflicts with rl.algorithm='gspo' (its preset sets 'gspo')"),
    ("trainer", {"mini_batches": 3}, "trainer.mini_batches (3) must divide the rollout batch (8 = "),
    ("objective", "gkd", "unknown objective 'gkd'; valid: 'rl', 'depo', 'depo-iw', 'opd', 'dgrpo', 'fkl'"),
])
def test_bad_config_fails_in_one_line_before_work(tmp_path, tiny_policy, section, value, message):
    out = tmp_path / "out"
    proc = lcr("train", str(write_config(tmp_path / "c.yaml", tiny_policy, **{section: value})), "--out", str(out))
    assert proc.returncode == 1
    (line,) = error_lines(proc.stderr)
    assert message in line
    assert not out.exists()


def test_empty_dataset_fails_naming_the_file(tmp_path, tiny_policy):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out"
    proc = lcr("train", str(write_config(tmp_path / "c.yaml", tiny_policy, data={"train_path": str(empty)})),
               "--out", str(out))
    assert proc.returncode == 1
    (line,) = error_lines(proc.stderr)
    assert str(empty) in line and "no samples" in line
    assert not out.exists()
