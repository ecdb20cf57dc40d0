"""examples/depo/*.yaml: every GPU recipe resolves as an ``RLRunConfig`` and its layout fits its hardware.

No GPU and no model download: Hugging Face configs cannot be fetched here, so the published
dimensions of each architecture are written below (from each model's ``config.json``:
hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size,
vocab_size) and ``validate_layout`` checks the recipe's layout against them. The hardware each
recipe is written for is its machine-readable header line ``# recipe: trainer_nodes=N rollout_nodes=K
gpus_per_node=G``: the trainer on N nodes, the SGLang servers on K nodes of their own (disaggregated:
``parallel/placement.py``), started by ``lcr rollout-servers`` and handed to the trainer as rollout.urls.
"""

from __future__ import annotations

import math
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from megatron_lcr.cli import main as lcr_main
from megatron_lcr.config import load_config
from megatron_lcr.parallel.layout import ModelDims, validate_layout
from megatron_lcr.parallel.placement import check_rollout_placement
from megatron_lcr.train.rl.config import RLRunConfig

REPO = Path(__file__).resolve().parents[1]
RECIPE_DIR = REPO / "examples" / "depo"
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))

# Published dimensions, keyed by the model directory name that model.hf_path ends in.
DIMS = {
    "Qwen2.5-7B-Instruct": ModelDims(num_layers=28, hidden_size=3584, num_attention_heads=28, num_query_groups=4,
                                     ffn_hidden_size=18944, vocab_size=152064),
    "Llama-3.1-8B-Instruct": ModelDims(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                                       ffn_hidden_size=14336, vocab_size=128256),
    "Llama-3.1-70B-Instruct": ModelDims(num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
                                        ffn_hidden_size=28672, vocab_size=128256),
}
# Tokens around the context in a prompt (instruction, question, chat template): an allowance.
PROMPT_OVERHEAD_TOKENS = 512
# Transformer Engine's FP8 GEMMs need every matrix dimension, tokens included, to be a multiple of 16.
FP8_TOKEN_MULTIPLE = 16


@dataclass(frozen=True)
class Recipe:
    path: Path
    cfg: RLRunConfig
    trainer_nodes: int
    rollout_nodes: int
    gpus_per_node: int
    dims: ModelDims

    @property
    def world_size(self) -> int:
        return self.trainer_nodes * self.gpus_per_node

    @property
    def nodes(self) -> int:
        return self.trainer_nodes + self.rollout_nodes


def read_header(path: Path) -> dict[str, str]:
    """The ``# recipe: key=value ...`` line of a recipe, as a dict."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("# recipe:")]
    assert len(lines) == 1, f"{path.name}: expected one '# recipe:' header line, found {len(lines)}"
    return dict(item.split("=", 1) for item in lines[0].removeprefix("# recipe:").split())


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    header = read_header(path)
    cfg = load_config(RLRunConfig, path, overrides or [])
    return Recipe(path=path, cfg=cfg, trainer_nodes=int(header["trainer_nodes"]),
                  rollout_nodes=int(header["rollout_nodes"]), gpus_per_node=int(header["gpus_per_node"]),
                  dims=DIMS[Path(cfg.model.hf_path).name])


@pytest.fixture(params=RECIPES, ids=[p.name for p in RECIPES])
def recipe(request) -> Recipe:
    return load_recipe(request.param)


def test_the_recipe_set():
    assert [p.name for p in RECIPES] == [
        "llama3.1-70b-dapo.yaml", "llama3.1-8b-dapo.yaml", "llama3.1-8b-gspo.yaml",
        "qwen2.5-7b-dapo.yaml", "qwen2.5-7b-gspo.yaml",
    ]


def test_lcr_config_prints_the_resolved_recipe(recipe, capsys):
    assert lcr_main(["config", "--kind", "train", str(recipe.path)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["parallel"]["tensor_model_parallel_size"] == recipe.cfg.parallel.tensor_model_parallel_size
    assert printed["rollout"]["server"]["tp_size"] == recipe.cfg.rollout.server.tp_size
    assert printed["rl"]["loss"]["name"] == recipe.cfg.rl.loss.name


def test_layout_fits_the_nodes_and_the_model(recipe):
    par, trainer = recipe.cfg.parallel, recipe.cfg.trainer
    tp, pp, cp = (par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size)
    dp = validate_layout(par, world_size=recipe.world_size, dims=recipe.dims, seq_length=trainer.token_budget)
    assert dp >= 1 and tp * pp * cp * dp == recipe.world_size
    rollouts = trainer.prompts_per_step * recipe.cfg.rl.group_size
    assert rollouts % dp == 0, f"{rollouts} rollouts per step do not split evenly over dp={dp}"
    assert par.use_distributed_optimizer
    # Megatron's interleaved schedule needs a micro-batch count divisible by PP; RL steps' counts vary.
    assert par.virtual_pipeline_model_parallel_size is None


def test_token_budget_holds_the_longest_sequence(recipe):
    cfg = recipe.cfg
    lb = cfg.data.longblocks
    longest = math.ceil(lb.long_tokens * (1 + lb.tolerance)) + PROMPT_OVERHEAD_TOKENS + cfg.rl.max_new_tokens
    assert longest <= cfg.trainer.token_budget, f"long prompt + response up to {longest} tokens"


def test_split_sequences_have_fixed_length_rows(recipe):
    """CP's zigzag split and SP's scatter need the packed row length divisible (checked above for
    token_budget); the trainer pads every row to token_budget only under pipeline parallelism."""
    par, budget = recipe.cfg.parallel, recipe.cfg.trainer.token_budget
    tp, cp = par.tensor_model_parallel_size, par.context_parallel_size
    if par.sequence_parallel or cp > 1:
        assert par.pipeline_model_parallel_size > 1
    if cp > 1 or recipe.cfg.model.fp8 is not None:
        assert recipe.cfg.model.transformer_impl == "transformer_engine"
    if recipe.cfg.model.fp8 is not None:
        per_rank = budget // (cp * (tp if par.sequence_parallel else 1))
        assert per_rank * cp * (tp if par.sequence_parallel else 1) == budget
        assert per_rank % FP8_TOKEN_MULTIPLE == 0


def test_rollout_servers_fill_their_own_nodes(recipe):
    rollout, dims = recipe.cfg.rollout, recipe.dims
    server = rollout.server
    assert server.backend == "sglang" and not rollout.urls  # the SLURM script passes the URLs
    assert recipe.rollout_nodes >= 1
    assert server.num_servers * server.tp_size == recipe.gpus_per_node  # one rollout node, all its GPUs
    assert server.host == "0.0.0.0"  # reachable from the trainer nodes
    # SGLang shards query heads over its TP ranks and splits (or replicates) KV heads.
    assert dims.num_attention_heads % server.tp_size == 0
    kv = dims.num_query_groups
    assert kv % server.tp_size == 0 or server.tp_size % kv == 0
    assert rollout.sync.mode == "distributed"
    assert rollout.sync.engine_tp_size == server.tp_size


def test_placement_check_passes_as_launched_and_refuses_colocation(recipe):
    """As the SLURM script launches it (rollout.urls given) the placement check passes; started with
    plain torchrun and no URLs, trainer rank 0 would launch the servers on its own node's GPUs, which
    the trainer ranks there use: the check refuses that with one line naming the GPUs."""
    trainer_gpus = range(recipe.gpus_per_node)
    launched = load_recipe(recipe.path, ["rollout.urls=[http://rollout-node:30000]"]).cfg.rollout
    check_rollout_placement(trainer_gpus=trainer_gpus, rollout_gpus=launched.launched_gpus(on_gpus=True),
                            sync_mode=launched.sync.mode)
    rollout = recipe.cfg.rollout
    with pytest.raises(ValueError, match=r"^rollout GPUs 0-7 are also trainer GPUs") as err:
        check_rollout_placement(trainer_gpus=trainer_gpus, rollout_gpus=rollout.launched_gpus(on_gpus=True),
                                sync_mode=rollout.sync.mode)
    assert "\n" not in str(err.value)


def test_paper_setting(recipe):
    cfg = recipe.cfg
    assert cfg.model.hf_path == f"/models/{Path(cfg.model.hf_path).name}"  # a placeholder to replace
    assert cfg.optimizer.lr == 5e-7
    assert (cfg.trainer.prompts_per_step, cfg.rl.group_size) == (64, 8)
    assert (cfg.rl.temperature, cfg.rl.max_new_tokens, cfg.rl.reward) == (0.7, 1000, "em")
    assert (cfg.data.longblocks.short_tokens, cfg.data.longblocks.long_tokens) == (1024, 15360)
    assert cfg.rl.context == "short"
    assert cfg.objective == "depo" and 0.5 <= cfg.depo.lam <= 1.0 and cfg.depo.tau == 1.0
    assert cfg.rl.loss.kl_coef == 0.0


def test_algorithm_settings(recipe):
    rl = recipe.cfg.rl
    assert rl.algorithm in recipe.path.stem
    if rl.algorithm == "dapo":
        assert rl.loss.name == "ppo"
        assert rl.loss.eps_high > rl.loss.eps_low
        assert rl.loss.aggregation == "token-mean"
        assert rl.advantage.dynamic_sampling
    else:
        assert rl.algorithm == "gspo"
        assert rl.loss.name == "gspo"
        assert rl.loss.aggregation == "seq-mean-token-mean"
        assert rl.loss.eps_low <= rl.loss.eps_high <= 1e-3


def test_70b_layout():
    r = load_recipe(RECIPE_DIR / "llama3.1-70b-dapo.yaml")
    par = r.cfg.parallel
    assert (par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size) == (8, 4, 2)
    assert par.use_distributed_optimizer and r.cfg.model.fp8 is not None
    assert r.cfg.rollout.server.tp_size == 8


def test_dims_are_what_the_checks_use():
    """A layout the architecture cannot take fails: Qwen2.5-7B's 28 heads do not split over TP=8."""
    r = load_recipe(RECIPE_DIR / "qwen2.5-7b-dapo.yaml", ["parallel.tp=8", "parallel.pp=1"])
    with pytest.raises(ValueError, match=r"num_attention_heads 28 is not divisible by tp\(8\)"):
        validate_layout(r.cfg.parallel, world_size=r.world_size, dims=r.dims, seq_length=r.cfg.trainer.token_budget)


def readme_rows(readme: Path = RECIPE_DIR / "README.md") -> dict[str, list[str]]:
    """The cells of each table row of ``readme`` whose first cell names a recipe file, by that name."""
    rows = {}
    for line in readme.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and re.fullmatch(r"`[^`]+\.yaml`", cells[0]):
            rows[cells[0].strip("`")] = cells
    return rows


def test_readme_table_matches_the_recipes(recipe):
    cells = readme_rows()[recipe.path.name]
    par = recipe.cfg.parallel
    dp = recipe.world_size // (par.tensor_model_parallel_size * par.pipeline_model_parallel_size
                               * par.context_parallel_size)
    assert cells[1] == Path(recipe.cfg.model.hf_path).name
    assert cells[3] == f"{recipe.trainer_nodes} + {recipe.rollout_nodes} x {recipe.gpus_per_node}"
    assert cells[4] == (f"{par.tensor_model_parallel_size}/{par.pipeline_model_parallel_size}/"
                        f"{par.context_parallel_size}/{dp}")
    assert recipe.path.name in cells[-1]


def launch_command(path: Path) -> list[str]:
    """The arguments of the header's ``lcr launch slurm`` command (backslash continuations joined)."""
    from tests.test_distill_recipes import header_commands

    lines = [line for line in header_commands(path) if "lcr launch slurm" in line]
    assert len(lines) == 1, f"{path.name}: {len(lines)} 'lcr launch slurm' lines in the header"
    return shlex.split(lines[0][lines[0].index("lcr launch slurm") + len("lcr launch slurm"):])


def test_launch_lines_request_the_recipes_nodes_and_pass_the_launchers_checks(recipe, tmp_path, capsys):
    """The header's ``lcr launch slurm`` asks for the recipe's trainer + rollout nodes and GPUs per node, and
    the launcher's own checks (layout against the GPUs, placement) accept it: a dry run writes the script."""
    from megatron_lcr.cli import build_parser

    args = launch_command(recipe.path)
    parsed = build_parser().parse_args(["launch", "slurm", *args])
    assert parsed.config == f"examples/depo/{recipe.path.name}"
    assert (parsed.nodes, parsed.rollout_nodes, parsed.gpus_per_node) == (
        recipe.nodes, recipe.rollout_nodes, recipe.gpus_per_node)
    out = tmp_path / "run"
    dry = [a if a != parsed.out else str(out) for a in args]
    assert lcr_main(["launch", "slurm", *dry, "--dry-run", "--no-check-urls"]) == 0, capsys.readouterr().err
    script = (out / "slurm" / "job.sbatch").read_text()
    assert f"#SBATCH --nodes={recipe.nodes}" in script
    subprocess.run(["bash", "-n", str(out / "slurm" / "job.sbatch")], check=True)
