"""What a QA training job needs from its tokenizer and prompt template, in one place.

SFT targets, RL rollouts and evaluation must agree on the prompt (``data.prompts``), on how a
response ends (EOS, or the chat template's end-of-turn token) and on how an answer is read back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_lcr.data.prompts import PromptConfig, prompt_ids
from megatron_lcr.data.schema import Sample
from megatron_lcr.data.tasks import TaskDataConfig
from megatron_lcr.data.tokenizer import load_tokenizer, token_counter
from megatron_lcr.train.evaluate import EvalConfig, Generate, evaluate

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
