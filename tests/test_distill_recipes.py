"""examples/distill/*.yaml: every distillation GPU recipe resolves (``RLRunConfig``; the sparse-to-dense
file as a ``PipelineConfig`` whose stages resolve over its base), and its layouts, placement, GPU count
and stated memory per GPU follow from the published model dimensions.

No GPU and no model download. Each model's dimensions are written below from its ``config.json``
(hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size, vocab_size,
tie_word_embeddings). A recipe's hardware is its machine-readable header line ``# recipe: trainer_nodes=N
rollout_nodes=K teacher_nodes=M gpus_per_node=G`` (a pipeline stage's: ``# recipe[stage]: ...``): the
trainer on N nodes, the student's SGLang servers on K nodes of their own, the teacher's SGLang servers on
M nodes of their own (0: a Megatron teacher inside the trainer). Its memory is ``# memory: gpu_gib=...
trainer_gib=... activations_gib=... teacher_weights_gib=... [teacher_kv_gib=...]`` in GiB per GPU.

Model directories: ``RLRunConfig`` compares the teacher's and the student's tokenizers (config.json's
vocab_size and the tokenizer files' bytes) as soon as it is built, and the recipes' ``/models/...``
placeholders do not exist here. Rather than patch that check out, the tests point both paths at real
directories holding what it reads: a config.json with the published vocabulary size and one tokenizer
file per family (Llama 3.x, Qwen3), so the check runs as it does at launch, and a teacher of another
family is refused (``test_the_tokenizer_check_runs``). Which model a recipe names is read from its
placeholder before the substitution.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from megatron_lcr.cli import main as lcr_main
from megatron_lcr.config import load_config
from megatron_lcr.parallel.layout import ModelDims, padded_vocab_size, validate_layout
from megatron_lcr.parallel.placement import check_rollout_placement
from megatron_lcr.pipeline.config import STAGES, PipelineConfig
from megatron_lcr.pipeline.run import stage_overrides
from megatron_lcr.train.rl.config import RLRunConfig
from tests.test_recipes import readme_rows

REPO = Path(__file__).resolve().parents[1]
RECIPE_DIR = REPO / "examples" / "distill"
PIPELINE = RECIPE_DIR / "llama-sparse-to-dense.yaml"
TRAIN_RECIPES = sorted(p for p in RECIPE_DIR.glob("*.yaml") if p != PIPELINE)
GIB = 2**30
# Tokens around the context in a prompt (instruction, question, chat template): an allowance.
PROMPT_OVERHEAD_TOKENS = 512
# A stated memory figure must be within this fraction of the one computed here.
MEMORY_RTOL = 0.10


@dataclass(frozen=True)
class Model:
    dims: ModelDims
    tied_embeddings: bool
    tokenizer: str
    """Tokenizer family: models of one family share their tokenizer files byte for byte."""


# Published dimensions, keyed by the model directory name the recipe's placeholder ends in.
# Llama-3.3-70B-Instruct has Llama-3.1-70B's dimensions.
MODELS = {
    "Llama-3.1-8B-Instruct": Model(
        ModelDims(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                  ffn_hidden_size=14336, vocab_size=128256), tied_embeddings=False, tokenizer="llama3"),
    "Llama-3.3-70B-Instruct": Model(
        ModelDims(num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
                  ffn_hidden_size=28672, vocab_size=128256), tied_embeddings=False, tokenizer="llama3"),
    "Qwen3-1.7B": Model(
        ModelDims(num_layers=28, hidden_size=2048, num_attention_heads=16, num_query_groups=8,
                  ffn_hidden_size=6144, vocab_size=151936), tied_embeddings=True, tokenizer="qwen3"),
    "Qwen3-8B": Model(
        ModelDims(num_layers=36, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                  ffn_hidden_size=12288, vocab_size=151936), tied_embeddings=False, tokenizer="qwen3"),
}


def layer_params(d: ModelDims) -> int:
    """One decoder layer: q, k, v, o projections (head_dim = hidden / heads for all four models), the
    SwiGLU MLP (gate, up, down) and two RMSNorm weights."""
    head_dim = d.hidden_size // d.num_attention_heads
    q = d.num_attention_heads * head_dim
    kv = d.num_query_groups * head_dim
    return 2 * d.hidden_size * q + 2 * d.hidden_size * kv + 3 * d.hidden_size * d.ffn_hidden_size + 2 * d.hidden_size


def rank_params(m: Model, tp: int, pp: int) -> float:
    """Parameters of the fullest pipeline stage, per tensor-parallel rank: its layers plus the embedding
    (first stage) or the output layer and final norm (last stage; with tied embeddings and PP > 1 Megatron
    keeps a copy of the embedding there); with PP = 1 both (tied: one matrix)."""
    d = m.dims
    vocab = padded_vocab_size(d.vocab_size, tp) * d.hidden_size
    layers = d.num_layers // pp * layer_params(d)
    if pp == 1:
        stage = layers + vocab * (1 if m.tied_embeddings else 2) + d.hidden_size
    else:
        stage = layers + vocab + d.hidden_size  # the last stage, which is >= the first
    return stage / tp


def trainer_bytes_per_param(dp: int) -> float:
    """bf16 weight + fp32 gradient (grad_reduce_in_fp32) + fp32 master weight and Adam m, v over DP."""
    return 2 + 4 + 12 / dp


def assert_close(stated: float, computed: float, what: str) -> None:
    assert math.isclose(stated, computed, rel_tol=MEMORY_RTOL), \
        f"{what}: the header says {stated} GiB, the dims give {computed:.2f}"


# --- headers -----------------------------------------------------------------------------------------

def header_values(path: Path, tag: str) -> dict[str, str]:
    """The ``# <tag>: key=value ...`` line of a recipe, as a dict (one such line)."""
    lines = [line for line in path.read_text().splitlines() if line.startswith(f"# {tag}:")]
    assert len(lines) == 1, f"{path.name}: expected one '# {tag}:' line, found {len(lines)}"
    return dict(item.split("=", 1) for item in lines[0].removeprefix(f"# {tag}:").split())


def header_commands(path: Path) -> list[str]:
    """The header's comment lines with backslash continuations joined (one logical line each)."""
    joined, current = [], ""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        current = f"{current} {text}".strip() if current else text
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        joined.append(current)
        current = ""
    return joined


def command_args(path: Path, program: str, contains: str = "") -> list[list[str]]:
    """The arguments of every header command that runs ``program`` (and contains ``contains``)."""
    found = []
    for line in header_commands(path):
        if program in line and contains in line:
            found.append(shlex.split(line[line.index(program):]))
    assert found, f"{path.name}: no '{program}' command{f' with {contains}' if contains else ''} in the header"
    return found


# --- model directories and loading ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """A directory per model with what the tokenizer check reads (module docstring)."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, m in MODELS.items():
        path = root / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"vocab_size": m.dims.vocab_size,
                                                      "tie_word_embeddings": m.tied_embeddings}))
        (path / "tokenizer.json").write_text(json.dumps({"family": m.tokenizer}))
        dirs[name] = path
    return dirs


def named_models(path: Path) -> tuple[str, str]:
    """(student, teacher) model names of a train recipe, from its placeholders."""
    raw = yaml.safe_load(path.read_text())
    return Path(raw["model"]["hf_path"]).name, Path(raw["distill"]["teacher"]["hf_path"]).name


def model_overrides(dirs: dict[str, Path], student: str, teacher: str) -> list[str]:
    return [f"model.hf_path={dirs[student]}", f"distill.teacher.hf_path={dirs[teacher]}"]


@dataclass(frozen=True)
class Recipe:
    path: Path
    cfg: RLRunConfig
    hardware: dict[str, int]
    memory: dict[str, float]
    student: Model
    teacher: Model

    @property
    def world_size(self) -> int:
        return self.hardware["trainer_nodes"] * self.hardware["gpus_per_node"]

    @property
    def engine_teacher(self) -> bool:
        return self.cfg.distill.teacher.scorer == "engine"


def load_recipe(path: Path, dirs: dict[str, Path], overrides: list[str] | None = None) -> Recipe:
    student, teacher = named_models(path)
    cfg = load_config(RLRunConfig, path, model_overrides(dirs, student, teacher) + (overrides or []))
    return Recipe(path=path, cfg=cfg, hardware={k: int(v) for k, v in header_values(path, "recipe").items()},
                  memory={k: float(v) for k, v in header_values(path, "memory").items()},
                  student=MODELS[student], teacher=MODELS[teacher])


@pytest.fixture(params=TRAIN_RECIPES, ids=[p.name for p in TRAIN_RECIPES])
def recipe(request, model_dirs) -> Recipe:
    return load_recipe(request.param, model_dirs)


def test_the_recipe_set():
    assert [p.name for p in TRAIN_RECIPES] == [
        "llama3.3-70b-to-llama3.1-8b-opd.yaml", "qwen3-8b-to-qwen3-1.7b-dgrpo.yaml",
    ]
    assert PIPELINE.is_file()


# --- train recipes ---------------------------------------------------------------------------------------

def test_lcr_config_resolves_the_recipe(recipe, model_dirs, capsys):
    student, teacher = named_models(recipe.path)
    args = ["config", "--kind", "train", str(recipe.path), *model_overrides(model_dirs, student, teacher)]
    assert lcr_main(args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["objective"] == recipe.cfg.objective in ("opd", "dgrpo")
    assert printed["distill"]["teacher"]["scorer"] == recipe.cfg.distill.teacher.scorer
    assert printed["distill"]["opd"]["estimator"] == recipe.cfg.distill.opd.estimator


def test_models_are_placeholders_of_one_tokenizer_family(recipe):
    raw = yaml.safe_load(recipe.path.read_text())
    for path in (raw["model"]["hf_path"], raw["distill"]["teacher"]["hf_path"]):
        assert path == f"/models/{Path(path).name}"
    assert recipe.student.tokenizer == recipe.teacher.tokenizer
    assert recipe.student.dims.vocab_size == recipe.teacher.dims.vocab_size


def test_student_layout_fits_the_nodes_and_the_model(recipe):
    par, trainer = recipe.cfg.parallel, recipe.cfg.trainer
    dp = validate_layout(par, world_size=recipe.world_size, dims=recipe.student.dims, seq_length=trainer.token_budget)
    rollouts = trainer.prompts_per_step * recipe.cfg.rl.group_size
    assert rollouts % dp == 0, f"{rollouts} rollouts per step do not split evenly over dp={dp}"
    assert par.use_distributed_optimizer
    assert par.virtual_pipeline_model_parallel_size is None


def test_teacher_layout(recipe):
    """A Megatron teacher runs on the student's layout, so that layout must also split the teacher, with
    the same padded vocabulary (the exact KL pairs their output-weight shards). An engine teacher's
    servers fill its own nodes, their TP splitting its heads."""
    par, hw = recipe.cfg.parallel, recipe.hardware
    tp = par.tensor_model_parallel_size
    if recipe.engine_teacher:
        server = recipe.cfg.distill.teacher.engine.server
        assert hw["teacher_nodes"] >= 1
        assert server.backend == "sglang" and server.host == "0.0.0.0"
        assert server.num_servers * server.tp_size == hw["gpus_per_node"]  # what each teacher node launches
        assert recipe.teacher.dims.num_attention_heads % server.tp_size == 0
        kv = recipe.teacher.dims.num_query_groups
        assert kv % server.tp_size == 0 or server.tp_size % kv == 0
        assert recipe.cfg.rl.temperature == 1.0
        assert recipe.cfg.distill.opd.estimator in ("k1", "k3")
        assert not recipe.cfg.distill.teacher.engine.urls  # given at launch (header)
    else:
        assert hw["teacher_nodes"] == 0
        validate_layout(par, world_size=recipe.world_size, dims=recipe.teacher.dims,
                        seq_length=recipe.cfg.trainer.token_budget)
        teacher_vocab, student_vocab = recipe.teacher.dims.vocab_size, recipe.student.dims.vocab_size
        assert padded_vocab_size(teacher_vocab, tp) == padded_vocab_size(student_vocab, tp)
        if recipe.cfg.distill.opd.estimator == "full":
            assert par.context_parallel_size == 1 and not par.sequence_parallel


def test_gpus_add_up(recipe):
    hw = recipe.hardware
    nodes = hw["trainer_nodes"] + hw["rollout_nodes"] + hw["teacher_nodes"]
    match = re.search(r"^# Hardware: (\d+) nodes x (\d+) GPUs = (\d+) GPUs", recipe.path.read_text(), flags=re.M)
    assert match, f"{recipe.path.name}: no '# Hardware: N nodes x G GPUs = T GPUs' line"
    assert (int(match.group(1)), int(match.group(2)), int(match.group(3))) == (
        nodes, hw["gpus_per_node"], nodes * hw["gpus_per_node"])
    server = recipe.cfg.rollout.server
    assert hw["rollout_nodes"] == 1 and server.num_servers * server.tp_size == hw["gpus_per_node"]
    assert server.backend == "sglang" and server.host == "0.0.0.0" and not recipe.cfg.rollout.urls
    assert recipe.cfg.rollout.sync.mode == "distributed"
    assert recipe.cfg.rollout.sync.engine_tp_size == server.tp_size


def test_placement_check_passes_as_launched_and_refuses_colocation(recipe, model_dirs):
    """With the student's servers given by URL the placement check passes; with no URLs trainer rank 0
    would launch them on GPUs its own node's trainer ranks use, which the check refuses."""
    trainer_gpus = range(recipe.hardware["gpus_per_node"])
    launched = load_recipe(recipe.path, model_dirs, ["rollout.urls=[http://rollout-node:30000]"]).cfg.rollout
    check_rollout_placement(trainer_gpus=trainer_gpus, rollout_gpus=launched.launched_gpus(on_gpus=True),
                            sync_mode=launched.sync.mode)
    rollout = recipe.cfg.rollout
    with pytest.raises(ValueError, match=r"^rollout GPUs 0-7 are also trainer GPUs"):
        check_rollout_placement(trainer_gpus=trainer_gpus, rollout_gpus=rollout.launched_gpus(on_gpus=True),
                                sync_mode=rollout.sync.mode)


def test_memory_per_gpu_follows_from_the_dims(recipe):
    par, mem = recipe.cfg.parallel, recipe.memory
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    dp = recipe.world_size // (tp * pp * par.context_parallel_size)
    trainer = rank_params(recipe.student, tp, pp) * trainer_bytes_per_param(dp) / GIB
    assert_close(mem["trainer_gib"], trainer, "trainer_gib")
    if recipe.engine_teacher:
        server = recipe.cfg.distill.teacher.engine.server
        weights = rank_params(recipe.teacher, 1, 1) * 2 / server.tp_size / GIB
        assert_close(mem["teacher_weights_gib"], weights, "teacher_weights_gib")
        assert_close(mem["teacher_kv_gib"], server.mem_fraction_static * mem["gpu_gib"] - weights, "teacher_kv_gib")
        on_trainer = mem["trainer_gib"] + mem["activations_gib"]
    else:
        weights = rank_params(recipe.teacher, tp, pp) * 2 / GIB  # bf16, every rank of its TP group
        assert_close(mem["teacher_weights_gib"], weights, "teacher_weights_gib")
        on_trainer = mem["trainer_gib"] + mem["activations_gib"] + mem["teacher_weights_gib"]
    assert on_trainer <= mem["gpu_gib"], f"trainer GPUs need {on_trainer} of {mem['gpu_gib']} GiB"


def test_token_budget_holds_the_longest_sequence(recipe):
    lb = recipe.cfg.data.longblocks
    longest = math.ceil(lb.long_tokens * (1 + lb.tolerance)) + PROMPT_OVERHEAD_TOKENS + recipe.cfg.rl.max_new_tokens
    assert longest <= recipe.cfg.trainer.token_budget, f"long prompt + response up to {longest} tokens"


def test_launch_lines_give_the_servers_urls(recipe):
    """The trainer's launch line passes the student's servers' URLs, and the engine teacher's."""
    train = command_args(recipe.path, "torchrun", "megatron_lcr.cli train")[0]
    assert str(recipe.path.relative_to(REPO)) in train
    assert any(a.startswith("rollout.urls=[") for a in train)
    assert any(a.startswith("distill.teacher.engine.urls=[") for a in train) == recipe.engine_teacher


def test_teacher_nodes_launch_the_engine_section(model_dirs):
    """`lcr rollout-servers` starts rollout.server: the teacher nodes' command overrides it with the values
    of distill.teacher.engine.server, and what it does not override is the same in both sections."""
    recipe = load_recipe(RECIPE_DIR / "llama3.3-70b-to-llama3.1-8b-opd.yaml", model_dirs)
    assert recipe.engine_teacher
    (args,) = command_args(recipe.path, "lcr rollout-servers", "rollout.server.model_path=")
    given = dict(a.removeprefix("rollout.server.").split("=", 1) for a in args if a.startswith("rollout.server."))
    teacher, base = recipe.cfg.distill.teacher, recipe.cfg.rollout.server
    assert given.pop("model_path") == str(Path("/models") / Path(teacher.hf_path).name)
    for key, value in given.items():
        assert getattr(teacher.engine.server, key) == yaml.safe_load(value), key
    for key in ("backend", "mem_fraction_static", "dtype", "host", "base_port"):
        assert getattr(base, key) == getattr(teacher.engine.server, key), key


def test_the_tokenizer_check_runs(recipe, model_dirs):
    """The checks the recipes pass are live: a teacher of another tokenizer family is refused, and an
    engine teacher refuses a rollout temperature other than 1."""
    student, _ = named_models(recipe.path)
    other = next(name for name, m in MODELS.items() if m.tokenizer != recipe.student.tokenizer)
    with pytest.raises(ValueError, match="vocab_size"):
        load_config(RLRunConfig, recipe.path, model_overrides(model_dirs, student, other))
    if recipe.engine_teacher:
        with pytest.raises(ValueError, match=r"scores at temperature 1 only"):
            load_recipe(recipe.path, model_dirs, ["rl.temperature=0.7"])


# --- the pipeline -----------------------------------------------------------------------------------------

def pipeline_stage_config(pipe: PipelineConfig, name: str, dirs: dict[str, Path], student: str, teacher: str,
                          extra: list[str] | None = None) -> RLRunConfig:
    """Stage ``name``'s ``lcr train`` config as lcr pipeline builds it, the input models in model dirs."""
    _, objective, trains, learns = next(s for s in STAGES if s[0] == name)
    overrides = stage_overrides(objective, init=str(dirs[teacher if trains == "teacher" else student]),
                                teacher=str(dirs[teacher]) if learns else None,
                                user=getattr(pipe.stages, name).overrides + (extra or []))
    # RL stages keep the base's teacher placeholder: objective 'rl' needs no teacher, so nothing reads it.
    return load_config(RLRunConfig, REPO / pipe.base, overrides)


@pytest.fixture(scope="module")
def pipeline() -> PipelineConfig:
    return load_config(PipelineConfig, PIPELINE)


def test_pipeline_resolves_over_its_base(pipeline, model_dirs):
    assert (REPO / pipeline.base).is_file() and REPO / pipeline.base in TRAIN_RECIPES
    student, teacher = named_models(REPO / pipeline.base)
    assert Path(pipeline.student).name == student
    assert pipeline.launcher[0] == "torchrun"
    for name, objective, _, _ in STAGES:
        cfg = pipeline_stage_config(pipeline, name, model_dirs, student, teacher)
        assert cfg.objective == objective
    assert pipeline.stages.teacher_rl.skip  # phase 1 runs on its own (header)
    assert not pipeline.stages.fkl.skip and not pipeline.stages.opd.skip


@pytest.mark.parametrize("stage", [s[0] for s in STAGES])
def test_pipeline_stage_layouts_and_gpus(pipeline, model_dirs, stage):
    student, teacher = named_models(REPO / pipeline.base)
    hw = {k: int(v) for k, v in header_values(PIPELINE, f"recipe[{stage}]").items()}
    cfg = pipeline_stage_config(pipeline, stage, model_dirs, student, teacher)
    trained = MODELS[teacher if stage == "teacher_rl" else student]
    world = hw["trainer_nodes"] * hw["gpus_per_node"]
    validate_layout(cfg.parallel, world_size=world, dims=trained.dims, seq_length=cfg.trainer.token_budget)
    server = cfg.rollout.server
    assert server.num_servers * server.tp_size == hw["rollout_nodes"] * hw["gpus_per_node"]
    assert cfg.rollout.sync.engine_tp_size == server.tp_size
    needs_teacher_servers = stage in ("fkl", "opd")
    assert (hw["teacher_nodes"] > 0) == needs_teacher_servers
    if needs_teacher_servers:
        t = cfg.distill.teacher.engine.server
        assert t.num_servers * t.tp_size == hw["gpus_per_node"]  # per teacher node
        assert cfg.distill.teacher.scorer == "engine" and cfg.rl.temperature == 1.0


def test_pipeline_stage_1_memory(pipeline, model_dirs):
    student, teacher = named_models(REPO / pipeline.base)
    hw = {k: int(v) for k, v in header_values(PIPELINE, "recipe[teacher_rl]").items()}
    mem = {k: float(v) for k, v in header_values(PIPELINE, "memory[teacher_rl]").items()}
    par = pipeline_stage_config(pipeline, "teacher_rl", model_dirs, student, teacher).parallel
    tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
    dp = hw["trainer_nodes"] * hw["gpus_per_node"] // (tp * pp * cp)
    computed = rank_params(MODELS[teacher], tp, pp) * trainer_bytes_per_param(dp) / GIB
    assert_close(mem["trainer_gib"], computed, "memory[teacher_rl] trainer_gib")
    assert mem["trainer_gib"] + mem["activations_gib"] <= mem["gpu_gib"]


def test_phase_1_runs_what_the_pipeline_would(pipeline, model_dirs):
    """The header's ``lcr launch slurm`` command for stage 1 is lcr pipeline's stage-1 lcr train command
    (objective, the raw teacher, the stage's overrides) on trainer + rollout nodes, and its export is
    `teacher:`."""
    from megatron_lcr.cli import build_parser

    base = REPO / pipeline.base
    raw_teacher = yaml.safe_load(base.read_text())["distill"]["teacher"]["hf_path"]
    (args,) = command_args(PIPELINE, "lcr launch slurm")
    launch, extra = build_parser().parse_known_args(args[1:])  # overrides after --out: as lcr's main merges them
    assert launch.config == pipeline.base
    assert [*launch.overrides, *extra] == stage_overrides("rl", init=raw_teacher, teacher=None,
                                               user=pipeline.stages.teacher_rl.overrides)
    hw = header_values(PIPELINE, "recipe[teacher_rl]")
    assert (launch.nodes, launch.rollout_nodes) == (int(hw["trainer_nodes"]) + int(hw["rollout_nodes"]),
                                                    int(hw["rollout_nodes"]))
    out = launch.out
    (convert,) = command_args(PIPELINE, "lcr convert megatron-to-hf", f"--ckpt {out}/")
    steps = load_config(RLRunConfig, base, model_overrides(model_dirs, *named_models(base))).trainer.steps
    assert convert[convert.index("--ckpt") + 1] == f"{out}/checkpoints/iter_{steps:07d}"
    assert convert[convert.index("--out") + 1] == pipeline.teacher


def test_pipeline_url_placeholders_become_url_lists(model_dirs, tmp_path):
    """The header's sed turns the placeholders into the servers' URL lists, which the stages resolve."""
    text = PIPELINE.read_text()
    assert text.count("ROLLOUT_URLS]") == 1 and text.count("TEACHER_URLS]") == 1  # one place each (anchors)
    student_urls = [f"http://rollout-node:{30000 + k}" for k in range(4)]
    teacher_urls = ["http://teacher-0:30000", "http://teacher-1:30000"]
    filled = text.replace("ROLLOUT_URLS", ",".join(student_urls)).replace("TEACHER_URLS", ",".join(teacher_urls))
    path = tmp_path / "pipeline.yaml"
    path.write_text(filled)
    pipe = load_config(PipelineConfig, path)
    student, teacher = named_models(REPO / pipe.base)
    for stage in ("fkl", "opd", "student_rl"):
        cfg = pipeline_stage_config(pipe, stage, model_dirs, student, teacher)
        assert cfg.rollout.urls == student_urls
        if stage != "student_rl":
            assert cfg.distill.teacher.engine.urls == teacher_urls


# --- README -----------------------------------------------------------------------------------------------

def test_readme_table_matches_the_recipes(recipe):
    cells = readme_rows(RECIPE_DIR / "README.md")[recipe.path.name]
    par, hw = recipe.cfg.parallel, recipe.hardware
    dp = recipe.world_size // (par.tensor_model_parallel_size * par.pipeline_model_parallel_size
                               * par.context_parallel_size)
    student, teacher = named_models(recipe.path)
    assert cells[1].split()[0] == recipe.cfg.objective
    assert (cells[2], cells[3]) == (student, teacher)
    assert cells[4] == f"{hw['trainer_nodes']} + {hw['rollout_nodes']} + {hw['teacher_nodes']} x {hw['gpus_per_node']}"
    assert cells[5] == (f"{par.tensor_model_parallel_size}/{par.pipeline_model_parallel_size}/"
                        f"{par.context_parallel_size}/{dp}")
    assert cells[6].startswith(recipe.cfg.distill.teacher.scorer)
    assert cells[7] == recipe.cfg.distill.opd.estimator
    assert recipe.path.name in cells[-1]
    assert PIPELINE.name in (RECIPE_DIR / "README.md").read_text()
