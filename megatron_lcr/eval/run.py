"""``lcr eval``: score a model on long-context benchmarks, per dataset, per length bucket and per group.

The work, in order, so that bad input fails before anything expensive starts:

1. The model is checked: a Hugging Face directory (``config.json``) or a megatron_lcr checkpoint
   (``lcr_checkpoint.json``, tokenizer and config in its ``hf/``). Every ``--data`` file is read and
   checked (``eval.formats``; errors name ``file:line``).
2. Prompts are built with the model's tokenizer and the training template, their length bucketed
   (``eval.buckets``) and, beyond the window, cut in the middle (``eval.truncate``). The window is
   the model's ``max_position_embeddings`` minus ``max_new_tokens``, or ``--max-prompt-tokens``.
3. Responses come from rollout servers launched for the model (``lcr serve`` on CPU by default,
   SGLang or vLLM: ``rollout.sglang.launch_servers``), from servers given by ``--urls``, or from an
   earlier run's ``predictions.jsonl`` (``--predictions``). A checkpoint is first exported to a
   temporary Hugging Face directory with ``lcr convert megatron-to-hf``'s code. Requests go through
   the trainer's :class:`~megatron_lcr.rollout.client.RolloutClient` (retries, failover).
4. Every response is scored by :func:`~megatron_lcr.eval.metrics.score_prediction` (the function
   ``lcr train``'s held-out evaluation uses), averaged over the k samples of its prompt (avg@k),
   and summarized; the outputs are written into a temporary directory renamed to ``--out`` at the
   end, so a failed run leaves no half-written results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_lcr.atomic import atomic_dir
from megatron_lcr.config import save_resolved
from megatron_lcr.data.schema import DataError, iter_jsonl
from megatron_lcr.data.tasks import TaskDataConfig
from megatron_lcr.eval.buckets import Scored, describe_buckets, length_bucket, summarize, summarize_groups
from megatron_lcr.eval.config import EvalRunConfig
from megatron_lcr.eval.formats import Benchmark, EvalItem, load_benchmark
from megatron_lcr.eval.metrics import score_prediction
from megatron_lcr.eval.report import results_table, write_outputs
from megatron_lcr.eval.truncate import truncate_middle
from megatron_lcr.models.megatron_checkpoint import HF_DIR, META_NAME
from megatron_lcr.train.task import TaskContext

# Prompts per generate() call: the progress bar moves once per chunk; the client spreads each chunk
# over the servers with max_concurrency requests in flight per server.
_CHUNK = 64


@dataclass(frozen=True)
class ModelSource:
    """The model to evaluate."""

    path: Path
    """What the user passed."""
    hf_dir: Path
    """Directory with its config.json and tokenizer (the model itself, or a checkpoint's hf/)."""
    checkpoint: bool
    """A megatron_lcr checkpoint (exported to Hugging Face before serving)."""


def resolve_model(path: str) -> ModelSource:
    """Check ``path`` is a Hugging Face model directory or a megatron_lcr checkpoint (one-line errors)."""
    model = Path(path)
    if not model.is_dir():
        raise ValueError(f"{path}: model directory not found")
    if (model / "config.json").is_file():
        return ModelSource(model, model, checkpoint=False)
    if (model / META_NAME).is_file():
        if not (model / HF_DIR / "config.json").is_file():
            raise ValueError(f"{model / HF_DIR}: the checkpoint has no config.json and tokenizer here")
        return ModelSource(model, model / HF_DIR, checkpoint=True)
    raise ValueError(f"{path}: neither a Hugging Face model directory (no config.json) nor a megatron_lcr "
                     f"checkpoint (no {META_NAME})")


def prompt_window(cfg: EvalRunConfig, hf_dir: Path) -> int:
    """Longest prompt in tokens: ``--max-prompt-tokens``, or max positions minus max new tokens."""
    positions = json.loads((hf_dir / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    wanted = None if cfg.max_prompt_tokens is None else cfg.max_prompt_tokens + cfg.max_new_tokens
    if positions is not None and wanted is not None and wanted > positions:
        raise ValueError(f"max_prompt_tokens ({cfg.max_prompt_tokens}) + max_new_tokens ({cfg.max_new_tokens}) exceed "
                         f"the model's max_position_embeddings ({positions})")
    if cfg.max_prompt_tokens is not None:
        return cfg.max_prompt_tokens
    if positions is None:
        raise ValueError(f"{hf_dir / 'config.json'} has no max_position_embeddings: pass --max-prompt-tokens")
    if positions <= cfg.max_new_tokens:
        raise ValueError(f"max_new_tokens ({cfg.max_new_tokens}) leaves no room for a prompt in the model's "
                         f"max_position_embeddings ({positions})")
    return positions - cfg.max_new_tokens


def dataset_names(paths: list[str]) -> list[str]:
    """File stems; where two clash (RULER's ``qa_1/validation.jsonl``, ``qa_2/validation.jsonl``), ``parent/stem``."""
    stems = [Path(p).stem for p in paths]
    names = [f"{Path(p).parent.name}/{s}" if stems.count(s) > 1 else s for p, s in zip(paths, stems)]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"two --data files would both be reported as {name!r}: rename one")
    return names


@dataclass(kw_only=True)
class EvalPrompt:
    """One prompt: an item with one of its contexts."""

    dataset: str
    """Name the item's file is reported under."""
    item: EvalItem
    """The benchmark record."""
    context: str
    """'short' or 'long' (single-context benchmarks: 'long')."""
    ids: list[int]
    """Token ids sent to the engine (after truncation)."""
    tokens: int
    """Prompt length before truncation (tokens); decides the length bucket."""
    truncated: bool
    """Whether the middle was cut to fit the window."""

    @property
    def groups(self) -> dict[str, str]:
        extra = {"context": self.context} if len(self.item.contexts) > 1 else {}
        return {**self.item.groups, **extra}


def build_prompts(benchmarks: dict[str, Benchmark], task: TaskContext, window: int) -> list[EvalPrompt]:
    """Every item with each of its contexts, tokenized and cut to ``window`` tokens."""
    from tqdm import tqdm

    prompts = []
    total = sum(len(b.items) for b in benchmarks.values())
    with tqdm(total=total, desc="lcr eval: building prompts", unit="item", file=sys.stderr) as bar:
        for name, benchmark in benchmarks.items():
            for item in benchmark.items:
                for context in item.contexts:
                    ids = task.prompts([item.sample], context)[0]
                    kept, truncated = truncate_middle(ids, window)
                    prompts.append(EvalPrompt(dataset=name, item=item, context=context, ids=kept, tokens=len(ids),
                                              truncated=truncated))
                bar.update()
    return prompts


@dataclass(frozen=True)
class Response:
    """One sampled response."""

    text: str
    """Decoded response (special tokens skipped)."""
    finish_reason: str | None
    """'stop', 'length', 'abort', or None (read from an earlier run's predictions)."""


@contextlib.contextmanager
def serving(cfg: EvalRunConfig, model_dir: str, hf_dir: Path, log_dir: Path) -> Iterator[Callable]:
    """``generate(requests) -> completions`` from ``cfg.urls``, or from servers launched for ``model_dir``."""
    from megatron_lcr.rollout.engines import check_served_model
    from megatron_lcr.rollout.served import served

    server = dataclasses.replace(cfg.server, model_path=model_dir, log_dir=str(log_dir))
    with served(server, urls=cfg.urls, restart=True, max_concurrency=cfg.max_concurrency, seed=cfg.seed) as model:
        launched = bool(model.launched)
        check_served_model(model.model_info(), model_dir if launched else str(hf_dir), launched=launched)
        yield model.generate


def generate_responses(cfg: EvalRunConfig, generate: Callable, prompts: list[EvalPrompt],
                       task: TaskContext) -> list[list[Response]]:
    """``cfg.samples`` responses per prompt, in prompt order."""
    from tqdm import tqdm

    from megatron_lcr.rollout.engine import GenerateRequest, SamplingParams

    sampling = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                              stop_token_ids=task.stop_token_ids, seed=cfg.seed)
    responses: list[list[Response | None]] = [[None] * cfg.samples for _ in prompts]
    with tqdm(total=len(prompts), desc="lcr eval: generating", unit="prompt", file=sys.stderr) as bar:
        for start in range(0, len(prompts), _CHUNK):
            chunk = prompts[start:start + _CHUNK]
            requests = [GenerateRequest(input_ids=p.ids, sampling=sampling, n=cfg.samples, rid=f"eval-{start + i}",
                                        return_logprob=False) for i, p in enumerate(chunk)]
            for c in generate(requests):
                responses[start + c.prompt_index][c.sample_index] = Response(task.decode(c.output_ids), c.finish_reason)
            bar.update(len(chunk))
    return responses


_PREDICTION_KEYS = ("dataset", "id", "context", "response")


def read_predictions(path: str, prompts: list[EvalPrompt], samples: int) -> list[list[Response]]:
    """The responses of an earlier run's predictions.jsonl, matched by (dataset, id, context, sample)."""
    index = {(p.dataset, p.item.sample.id, p.context): i for i, p in enumerate(prompts)}
    responses: list[list[Response | None]] = [[None] * samples for _ in prompts]
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in _PREDICTION_KEYS):
            raise DataError(f"{where}: expected an object with string fields dataset, id, context and response")
        key = (row["dataset"], row["id"], row["context"])
        j = row.get("sample", 0)
        if key not in index:
            raise DataError(f"{where}: no prompt {key} among the --data files")
        if not isinstance(j, int) or isinstance(j, bool) or not 0 <= j < samples:
            raise DataError(f"{where}: field 'sample' must be an integer in [0, {samples}) (--samples {samples})")
        responses[index[key]][j] = Response(row["response"], row.get("finish_reason"))
    for p, got in zip(prompts, responses):
        if None in got:
            raise DataError(f"{path}: no response {got.index(None)} for dataset {p.dataset!r} id {p.item.sample.id!r} "
                            f"context {p.context!r}")
    return responses


def score_responses(cfg: EvalRunConfig, prompts: list[EvalPrompt],
                    responses: list[list[Response]]) -> tuple[list[dict], list[Scored]]:
    """``(predictions.jsonl rows, one Scored per prompt)``: every response scored, then averaged per prompt."""
    rows, scored = [], []
    for p, got in zip(prompts, responses):
        sample, bucket = p.item.sample, length_bucket(p.tokens)
        scores = [score_prediction(r.text, sample, cfg.prompt, metric=p.item.metric) for r in got]
        for j, (r, s) in enumerate(zip(got, scores)):
            rows.append({"dataset": p.dataset, "id": sample.id, "context": p.context, "sample": j,
                         "prompt_tokens": p.tokens, "truncated": p.truncated, "length_bucket": bucket,
                         "groups": p.groups, "metric": p.item.metric, "gold": sample.answers, "response": r.text,
                         "answer": s.answer, "score": s.score, "em": s.em, "finish_reason": r.finish_reason})
        k = len(scores)
        scored.append(Scored(score=sum(s.score for s in scores) / k, em=sum(s.em for s in scores) / k, bucket=bucket,
                             truncated=p.truncated, groups=p.groups))
    return rows, scored


def summarize_datasets(benchmarks: dict[str, Benchmark], prompts: list[EvalPrompt], scored: list[Scored]) -> dict:
    """``{name: {file, format, metric, items, **summarize(...), groups: summarize_groups(...)}}``."""
    out = {}
    for name, benchmark in benchmarks.items():
        mine = [s for p, s in zip(prompts, scored) if p.dataset == name]
        metrics = sorted({item.metric for item in benchmark.items})
        out[name] = {"file": benchmark.path, "format": benchmark.format, "metric": ", ".join(metrics),
                     "items": len(benchmark.items), **summarize(mine), "groups": summarize_groups(mine)}
    return out


def _responses(cfg: EvalRunConfig, model: ModelSource, prompts: list[EvalPrompt], task: TaskContext,
               work: Path) -> list[list[Response]]:
    """Responses from --predictions, or generated by servers (a checkpoint exported first, then removed)."""
    if cfg.predictions:
        return read_predictions(cfg.predictions, prompts, cfg.samples)
    model_dir = str(model.path)
    export = work / ".model_hf"
    if model.checkpoint and not cfg.urls:
        from megatron_lcr.models.convert import megatron_to_hf

        print(f"lcr eval: exporting checkpoint {model.path} to Hugging Face format", file=sys.stderr)
        megatron_to_hf(model.path, export)
        model_dir = str(export)
    try:
        with serving(cfg, model_dir, model.hf_dir, work / "logs") as generate:
            return generate_responses(cfg, generate, prompts, task)
    finally:
        shutil.rmtree(export, ignore_errors=True)


def _without_secrets(cfg: EvalRunConfig) -> EvalRunConfig:
    """``cfg`` as config.yaml shows it: the servers' API key is not written to disk."""
    if cfg.server.api_key is None:
        return cfg
    return dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, api_key="<redacted>"))


def run_eval(cfg: EvalRunConfig) -> dict:
    """Evaluate ``cfg.model`` on ``cfg.data``; write ``cfg.out``; return results.json's content."""
    model = resolve_model(cfg.model)
    names = dataset_names(list(cfg.data))
    benchmarks = {name: load_benchmark(path, cfg.format, metric=cfg.metric, limit=cfg.limit, contexts=cfg.contexts)
                  for name, path in zip(names, cfg.data)}
    if cfg.predictions and not Path(cfg.predictions).is_file():
        raise DataError(f"{cfg.predictions}: no such file")
    window = prompt_window(cfg, model.hf_dir)
    task = TaskContext.create(TaskDataConfig(), cfg.prompt, model.hf_dir)
    with atomic_dir(cfg.out, overwrite=cfg.overwrite) as work:
        prompts = build_prompts(benchmarks, task, window)
        responses = _responses(cfg, model, prompts, task, work)
        rows, scored = score_responses(cfg, prompts, responses)
        results = {
            "model": str(model.path), "source": cfg.predictions or ("urls" if cfg.urls else cfg.server.backend),
            "decoding": {"temperature": cfg.temperature, "samples": cfg.samples, "seed": cfg.seed,
                         "max_new_tokens": cfg.max_new_tokens},
            "max_prompt_tokens": window,
            "length_buckets": describe_buckets(),
            "datasets": summarize_datasets(benchmarks, prompts, scored),
        }
        save_resolved(_without_secrets(cfg), work / "config.yaml")
        write_outputs(work, results, rows)
    print(results_table(results))
    print(f"lcr eval: wrote {cfg.out}", file=sys.stderr)
    return results
