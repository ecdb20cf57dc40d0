"""The reference server's model: a Hugging Face causal LM run with SGLang's sampling semantics.

:class:`ModelRunner` loads ``AutoModelForCausalLM`` (eval mode, no grad) and its tokenizer, runs
left-padded batched prefill and one-token decode steps over a ``DynamicCache``, samples with
:mod:`megatron_lcr.rollout.reference.sampling`, and validates and copies weight updates by Hugging Face name.
Its methods are not thread-safe: :mod:`megatron_lcr.rollout.reference.server` calls them from one
model thread only, so forward steps and weight copies never overlap.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from megatron_lcr.rollout.checksum import tensor_checksum
from megatron_lcr.rollout.reference.sampling import BadRequest, Sequence, check_finish, sample_token, top_logprobs


class ModelRunner:
    """The HF model and tokenizer; every method runs on the server's single model thread."""

    def __init__(self, model_dir: str, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if not os.path.isdir(model_dir):
            raise ValueError(f"model directory {model_dir} does not exist")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise ValueError(f"{model_dir} has no config.json: not a Hugging Face model directory")
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        try:
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - one line for the CLI, whatever transformers raises
            raise ValueError(f"cannot load a causal LM from {model_dir}: {err}") from err
        self.model.eval()
        try:
            self.tokenizer = _LockedTokenizer(AutoTokenizer.from_pretrained(model_dir, local_files_only=True))
        except Exception:  # noqa: BLE001 - a model without tokenizer still serves input_ids
            self.tokenizer = None
        self.config = self.model.config
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.context_len = int(getattr(self.config, "max_position_embeddings", 1 << 30))
        self.eos_token_ids = self._eos_ids()
        # Tied weights appear under every name (lm_head.weight and model.embed_tokens.weight).
        self.params = dict(self.model.named_parameters(remove_duplicate=False))
        self.forward_sleep_s = 0.0

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (self.config, getattr(self.model, "generation_config", None), self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            ids.update([value] if isinstance(value, int) else (value or []))
        return frozenset(ids)

    # -- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, seqs: list[Sequence]) -> "_Batch":
        """Run the left-padded prompts, fill input log-probs, sample every first token."""
        from transformers import DynamicCache

        lengths = [len(s.input_ids) for s in seqs]
        width = max(lengths)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, width - lengths[row]:] = torch.tensor(seq.input_ids)
            mask[row, width - lengths[row]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # Full logits only when someone scores its prompt beyond the last token.
        full = any(s.return_logprob and s.logprob_start_len < len(s.input_ids) - 1 for s in seqs)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=DynamicCache(config=self.config), use_cache=True,
                         logits_to_keep=0 if full else 1)
        for row, seq in enumerate(seqs):
            if seq.return_logprob:
                self._input_logprobs(seq, out.logits[row, width - lengths[row]:] if full else None)
        batch = _Batch(cache=out.past_key_values, mask=mask, last_pos=positions[:, -1].clone())
        for row, seq in enumerate(seqs):
            if seq.max_new_tokens == 0:
                seq.finish_reason = {"type": "length", "length": 0}
            else:
                self._advance(seq, out.logits[row, -1])
        time.sleep(self.forward_sleep_s)  # /slow_down; 0 by default
        return batch

    def _input_logprobs(self, seq: Sequence, logits: torch.Tensor | None) -> None:
        """SGLang's layout: entries for ``input_ids[start:]``, the first with a null log-prob."""
        start = seq.logprob_start_len
        seq.input_logprobs = [None]
        seq.input_top = [None]
        if logits is None or start >= len(seq.input_ids) - 1:
            return
        # logits[j] predicts input_ids[j + 1]; raw log_softmax, no temperature (as SGLang).
        logprobs = torch.log_softmax(logits[start:-1].float(), dim=-1)
        targets = torch.tensor(seq.input_ids[start + 1:])
        seq.input_logprobs += logprobs.gather(-1, targets[:, None])[:, 0].tolist()
        if seq.top_logprobs_num > 0:
            seq.input_top += [top_logprobs(row, seq.top_logprobs_num) for row in logprobs]

    @torch.no_grad()
    def decode_step(self, seqs: list[Sequence], batch: "_Batch") -> None:
        """Feed every row's last token (finished rows too: rows are independent) and sample again."""
        last = torch.tensor([s.output_ids[-1] if s.output_ids else 0 for s in seqs])[:, None]
        batch.mask = torch.cat([batch.mask, torch.ones(len(seqs), 1, dtype=torch.long)], dim=1)
        batch.last_pos += 1
        out = self.model(input_ids=last, attention_mask=batch.mask, position_ids=batch.last_pos[:, None],
                         past_key_values=batch.cache, use_cache=True)
        batch.cache = out.past_key_values
        for row, seq in enumerate(seqs):
            if seq.finish_reason is None:
                self._advance(seq, out.logits[row, -1])
        time.sleep(self.forward_sleep_s)  # /slow_down; 0 by default

    def _advance(self, seq: Sequence, logits: torch.Tensor) -> None:
        token, logprobs = sample_token(logits, seq.spec, seq.generator)
        seq.output_ids.append(token)
        if seq.return_logprob:
            seq.output_logprobs.append(float(logprobs[token]))
            if seq.top_logprobs_num > 0:
                seq.output_top.append(top_logprobs(logprobs, seq.top_logprobs_num))
        tokenizer, skip = self.tokenizer, seq.spec.skip_special_tokens
        decode = None if tokenizer is None else lambda ids: tokenizer.decode(ids, skip_special_tokens=skip)
        seq.finish_reason = check_finish(seq.output_ids, seq.spec, max_new_tokens=seq.max_new_tokens,
                                         eos_token_ids=self.eos_token_ids, decode=decode)

    # -- weights ---------------------------------------------------------------------------------

    def validate_weights(self, named: list[tuple[str, torch.Tensor]], *, same_dtype: bool = False) -> None:
        """Raise ``BadRequest`` naming the first unknown name, shape mismatch or (``same_dtype``) dtype mismatch."""
        for name, tensor in named:
            param = self.params.get(name)
            if param is None:
                raise BadRequest(f"unknown parameter {name!r}: the model has no parameter of that name")
            if tuple(param.shape) != tuple(tensor.shape):
                raise BadRequest(f"parameter {name!r} has shape {list(param.shape)}, the update has "
                                 f"{list(tensor.shape)}")
            if same_dtype and param.dtype != tensor.dtype:
                raise BadRequest(f"parameter {name!r} has dtype {param.dtype}, the update has {tensor.dtype}")

    @torch.no_grad()
    def copy_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in named:
            self.params[name].copy_(tensor)

    @torch.no_grad()
    def checksums(self) -> dict[str, str]:
        return {name: tensor_checksum(p) for name, p in self.model.named_parameters()}


class _LockedTokenizer:
    """A HF tokenizer used from two threads (requests and stop strings): fast tokenizers are Rust
    objects whose encode borrows them mutably, so concurrent use can fail with "Already borrowed"."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer, self._lock = tokenizer, threading.Lock()
        self.eos_token_id = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        with self._lock:
            return self._tokenizer.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        with self._lock:
            return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@dataclass(eq=False)
class _Batch:
    """The KV cache of a running batch and each row's attention mask and last position."""

    cache: Any
    mask: torch.Tensor
    last_pos: torch.Tensor


def read_safetensors_dir(model_path: str) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of a HF directory, sharded (with index) or single-file."""
    from megatron_lcr.models.hf_checkpoint import SafetensorsReader

    reader = SafetensorsReader(model_path)
    return [(name, reader.get(name)) for name in reader.keys()]
