"""``lcr pipeline CONFIG --out DIR``: the sparse-to-dense workflow (Beyond GRPO and On-Policy Distillation)
as one resumable run.

    1 teacher_rl   sparse-reward RL on the larger teacher            -> the teacher of 2a and 2b
    2a fkl         forward-KL warmup of the student on its samples
    2b opd         on-policy distillation under the student's rollouts (or dGRPO)
    3 student_rl   optional sparse-reward RL on the student

Each stage is an ``lcr train`` run in ``DIR/<stage>/`` (a child process, through ``launcher``), starting
from the previous stage's weights of the model it trains; its final checkpoint is exported to
``DIR/<stage>/hf`` and feeds the next. After every stage the boundary check (:mod:`.check`) logs the
teacher-student KL on held-out prompts and both models' held-out EM. ``DIR/pipeline_state.json``
records finished stages: rerunning the same command after a kill skips them and resumes the
unfinished stage from its newest checkpoint (``lcr train`` resumes by itself). At the end a table of
every stage goes to stdout, ``DIR/results.md`` and ``DIR/results.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from megatron_lcr.atomic import atomic_write_text
from megatron_lcr.config import load_config, save_resolved
from megatron_lcr.models.convert import megatron_to_hf
from megatron_lcr.models.hf_checkpoint import HFCheckpointError
from megatron_lcr.pipeline.check import boundary_check
from megatron_lcr.pipeline.config import STAGES, PipelineConfig
from megatron_lcr.train.model_setup import has_hf_weights
from megatron_lcr.train.rl.config import RLRunConfig

STATE_NAME = "pipeline_state.json"


def stage_overrides(objective: str, *, init: str, teacher: str | None, user: list[str]) -> list[str]:
    """The ``lcr train`` overrides of a stage: its objective, starting weights, teacher, then the user's."""
    own = [f"objective={objective}", f"model.hf_path={init}"]
    if teacher is not None:
        own.append(f"distill.teacher.hf_path={teacher}")
    return own + list(user)


def _check_model_dir(path: str, what: str) -> None:
    if not has_hf_weights(Path(path)):
        raise HFCheckpointError(f"{what} {path}: no Hugging Face weights there (a missing or unfinished stage output)")


def validate_pipeline(cfg: PipelineConfig) -> None:
    """Resolve every stage's ``lcr train`` config now, with the pipeline's input models in place of the stage
    outputs (same tokenizer): a bad key, a missing model or a teacher that cannot be used fails before any work."""
    _check_model_dir(cfg.student, "student")
    _check_model_dir(cfg.teacher, "teacher")
    for name, objective, trains, learns in STAGES:
        stage = getattr(cfg.stages, name)
        if stage.skip:
            continue
        init = cfg.teacher if trains == "teacher" else cfg.student
        overrides = stage_overrides(objective, init=init, teacher=cfg.teacher if learns else None, user=stage.overrides)
        try:
            run_cfg = load_config(RLRunConfig, cfg.base, overrides)
        except Exception as err:  # noqa: BLE001 - name the stage, keep the one line
            raise type(err)(f"stage {name}: {err}") from None
        _check_model_dir(run_cfg.model.hf_path, f"stage {name}: model.hf_path")


def _train(cfg: PipelineConfig, stage_dir: Path, overrides: list[str], name: str) -> dict:
    command = [*(cfg.launcher or [sys.executable]), "-m", "megatron_lcr.cli", "train", cfg.base, "--out",
               str(stage_dir), *overrides]
    print(f"lcr pipeline: stage {name}: {' '.join(command)}", flush=True)
    code = subprocess.call(command)
    if code != 0:
        raise RuntimeError(f"stage {name} failed (exit {code}); its output is above and under {stage_dir}; "
                           "rerun the same lcr pipeline command to resume it")
    return json.loads((stage_dir / "results.json").read_text(encoding="utf-8"))


def run_pipeline(cfg: PipelineConfig, out_dir: str | Path) -> dict:
    """Run (or resume) every stage; returns ``results.json``'s content."""
    out_dir = Path(out_dir)
    state_path = out_dir / STATE_NAME
    state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.is_file() else {"stages": {}}
    done = state["stages"]
    validate_pipeline(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out_dir / "config.yaml")
    models = {"teacher": cfg.teacher, "student": cfg.student}
    teacher_eval, ran = None, []
    for name, objective, trains, learns in STAGES:
        if getattr(cfg.stages, name).skip:
            continue
        overrides = stage_overrides(objective, init=models[trains], teacher=models["teacher"] if learns else None,
                                    user=getattr(cfg.stages, name).overrides)
        record = done.get(name)
        if record is None or not has_hf_weights(Path(record["hf"])):
            record = _run_stage(cfg, out_dir, name, trains, overrides, models, teacher_eval)
            done[name] = record
            atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")
        models[trains] = record["hf"]
        teacher_eval = record["teacher_eval"]
        ran.append(record)
    return _finish(out_dir, ran)


def _run_stage(cfg: PipelineConfig, out_dir: Path, name: str, trains: str, overrides: list[str], models: dict,
               teacher_eval: dict | None) -> dict:
    started = time.time()
    stage_dir = out_dir / name
    results = _train(cfg, stage_dir, overrides, name)
    hf = stage_dir / "hf"
    if not has_hf_weights(hf):
        megatron_to_hf(results["checkpoint"], hf, overwrite=True)
    models = {**models, trains: str(hf)}
    if trains == "teacher":
        teacher_eval = results["trained"]
    run_cfg = load_config(RLRunConfig, cfg.base, overrides)
    check = boundary_check(run_cfg, student=models["student"], teacher=models["teacher"], check=cfg.check,
                           log_dir=stage_dir / "check_logs", teacher_eval=teacher_eval)
    trained = results["trained"]
    row = {"name": name, "model": trains, "short_em": trained.get("short_em"), "long_em": trained.get("long_em"),
           "teacher_student_kl": check["kl_k3"], "teacher_student_kl_k1": check["kl_k1"],
           "teacher_short_em": check["teacher"].get("short_em"), "teacher_long_em": check["teacher"].get("long_em"),
           "start_short_em": results["base"].get("short_em"), "start_long_em": results["base"].get("long_em"),
           "steps": results["steps"], "wall_seconds": time.time() - started}
    print(f"lcr pipeline: stage {name} done: {json.dumps(row)}", flush=True)
    return {"hf": str(hf), "row": row, "teacher_eval": check["teacher"]}


def results_table(rows: list[dict]) -> str:
    """A markdown table of the stages' rows."""
    def cell(value) -> str:
        return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

    columns = ("name", "model", "steps", "start_long_em", "short_em", "long_em", "teacher_short_em",
               "teacher_long_em", "teacher_student_kl", "wall_seconds")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _finish(out_dir: Path, records: list[dict]) -> dict:
    rows = [r["row"] for r in records]
    results = {"stages": rows}
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    table = results_table(rows)
    atomic_write_text(out_dir / "results.md", table)
    print(table, end="", flush=True)
    return results
