"""What a QA training job (``lcr sft``, ``lcr train``) needs from its tokenizer and prompt, and its start-up.

SFT targets, RL rollouts and evaluation must agree on the prompt (``data.prompts``), on how a
response ends (EOS, or the chat template's end-of-turn token) and on how an answer is read back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_lcr.config import save_resolved
from megatron_lcr.data.prompts import PromptConfig, prompt_ids
from megatron_lcr.data.schema import Sample
from megatron_lcr.data.tasks import TaskDataConfig, load_task_samples
from megatron_lcr.data.tokenizer import load_tokenizer, token_counter
from megatron_lcr.models.families import hf_arch, model_dims
from megatron_lcr.models.hf_checkpoint import load_hf_config
from megatron_lcr.models.megatron_checkpoint import config_dir
from megatron_lcr.parallel.state import initialize_megatron
from megatron_lcr.train.evaluate import EvalConfig, Generate, evaluate
from megatron_lcr.train.model_setup import build_policy
from megatron_lcr.train.optimizer import build_optimizer

# Chat templates end an assistant turn with their own token; generation stops at it as at EOS.
_END_OF_TURN = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>")


@dataclass
class TaskContext:
    """Tokenizer + prompt template of a job."""

    tokenizer: Any
    """Hugging Face tokenizer."""
    prompt: PromptConfig
    """Prompt template and answer extraction."""

    @classmethod
    def create(cls, data: TaskDataConfig, prompt: PromptConfig, model_dir: str | Path) -> TaskContext:
        tokenizer = load_tokenizer(data.tokenizer or model_dir)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer of {data.tokenizer or model_dir} has no EOS token: responses could not end")
        return cls(tokenizer=tokenizer, prompt=prompt)

    @property
    def count_tokens(self):
        return token_counter(self.tokenizer)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    @property
    def stop_token_ids(self) -> list[int]:
        """EOS and the template's end-of-turn token, where the vocabulary has one."""
        ids = {self.tokenizer.eos_token_id}
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[token] for token in _END_OF_TURN if token in vocab)
        return sorted(ids)

    def response_ids(self, answer: str) -> list[int]:
        """The target response for ``answer``: ``"<answer_prefix> <answer>"`` and EOS."""
        text = f"{self.prompt.answer_prefix} {answer}"
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + [self.tokenizer.eos_token_id]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def prompts(self, samples: list[Sample], context: str) -> list[list[int]]:
        return [prompt_ids(s, context, self.prompt, self.tokenizer) for s in samples]

    def evaluate(self, generate: Generate, samples: list[Sample], cfg: EvalConfig) -> dict:
        """Held-out EM/score in percent per context (see ``train.evaluate``)."""
        prompts = {context: self.prompts(samples, context) for context in cfg.contexts}
        return evaluate(generate, samples, prompts, cfg=cfg, prompt_cfg=self.prompt, decode=self.decode,
                        stop_token_ids=self.stop_token_ids)


@dataclass
class QAJob:
    """What ``lcr sft`` and ``lcr train`` set up identically before their loops."""

    task: TaskContext
    """Tokenizer and prompt template."""
    train: list[Sample]
    """Training samples."""
    held_out: list[Sample]
    """Held-out samples (evaluation)."""
    policy: Any
    """This rank's trainable policy (``model_setup.Policy``)."""
    optimizer: Any
    """Megatron optimizer."""
    scheduler: Any
    """Megatron LR schedule."""
    data_parallel_size: int
    """Data-parallel ranks."""
    is_main: bool
    """Global rank 0 (writes the run's files)."""


def start_qa_job(cfg, out_dir: Path, *, load: str | None, seed: int, total_steps: int,
                 check_dp: Callable[[int], None] | None = None) -> QAJob:
    """Samples first (bad data fails before Megatron starts), then Megatron, the resolved config,
    the policy and its optimizer. ``cfg`` has ``model, parallel, optimizer, data, prompt`` sections;
    ``check_dp(data_parallel_size)`` may reject the layout before anything is written."""
    model_dir = config_dir(cfg.model.hf_path, load)
    task = TaskContext.create(cfg.data, cfg.prompt, model_dir)
    train = load_task_samples(cfg.data, "train", task.count_tokens)
    held_out = load_task_samples(cfg.data, "eval", task.count_tokens)
    dp = initialize_megatron(cfg.parallel, seed=seed, dims=model_dims(hf_arch(load_hf_config(model_dir))))
    if check_dp is not None:
        check_dp(dp)
    is_main = torch.distributed.get_rank() == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out_dir / "config.yaml")
    policy = build_policy(cfg.model, cfg.parallel, load=load)
    optimizer, scheduler = build_optimizer(cfg.optimizer, policy.chunks, params_dtype=policy.chunks[0].config.params_dtype,
                                           use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
                                           total_steps=total_steps)
    return QAJob(task=task, train=train, held_out=held_out, policy=policy, optimizer=optimizer, scheduler=scheduler,
                 data_parallel_size=dp, is_main=is_main)
