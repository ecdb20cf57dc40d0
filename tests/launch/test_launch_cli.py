"""``lcr launch slurm`` without a cluster: the script it writes, and bad input refused before anything is
written or submitted.

- SLURM time limits parse to the seconds SLURM means (hand-computed), malformed ones are refused.
- The 7B DePO recipe on 2 nodes (1 trainer node, 1 rollout node of 8 GPUs): the dry run prints exactly
  the script it wrote, bash parses it, its #SBATCH lines and settings are the job asked for (one task
  per node, 64 CPUs, requeue, the USR1 warning, pyxis container flags, extra environment), the checked
  layout is TP=2 PP=2 CP=1 DP=2, and the command line in its header writes the identical script again.
  A CPU job asks for no GPUs and no exclusive nodes. The committed example (examples/slurm/) is what
  tools/launch_slurm.py writes today from the command in its header (paths aside).
- Bad input, each one line on stderr and exit status 1, with no output directory made and sbatch never
  run (a tripwire sbatch first on PATH would leave a file): fewer and more GPUs than the layout takes
  (policy, rollout node, Megatron teacher, teacher servers on trainer GPUs), a partition name with
  spaces, a malformed time limit, rollout URLs that do not answer (a port nobody listens on), rollout
  nodes next to rollout.urls. A URL that answers /health passes the same check.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from megatron_lcr.cli import main as lcr_main
from megatron_lcr.launch.config import slurm_time_seconds
from tests.distributed import REPO_ROOT

RECIPE = REPO_ROOT / "examples" / "depo" / "qwen2.5-7b-dapo.yaml"
EXAMPLE = REPO_ROOT / "examples" / "slurm" / "qwen2.5-7b-dapo.sbatch"
EXAMPLE_CHECKOUT = "/srv/megatron_lcr"  # where examples/slurm/README.md says the example was generated
TINY = {
    "model": {"params_dtype": "float32"},
    "trainer": {"steps": 2, "prompts_per_step": 4, "token_budget": 512},
    "data": {"num_eval": 4, "longblocks": {"num_samples": 16}},
    "rl": {"group_size": 2, "max_new_tokens": 6},
    "objective": "depo",
}


@pytest.mark.parametrize("text, seconds", [
    ("90", 90 * 60), ("1:30", 90), ("2:00:00", 7200), ("1-0", 86400), ("1-2:30", 86400 + 2 * 3600 + 30 * 60),
    ("1-2:30:15", 86400 + 2 * 3600 + 30 * 60 + 15), ("UNLIMITED", None), ("infinite", None),
])
def test_slurm_time_limits(text, seconds):
    assert slurm_time_seconds(text) == seconds


@pytest.mark.parametrize("text", ["1:2:3:4", "1h", "-5", "1-", "", "1:30 "])
def test_malformed_time_limits_are_refused(text):
    with pytest.raises(ValueError, match="is not a SLURM time"):
        slurm_time_seconds(text)


@pytest.fixture
def no_sbatch(tmp_path, monkeypatch) -> Path:
    """An ``sbatch`` first on PATH that only leaves a file behind: proof that nothing was submitted."""
    bin_dir, marker = tmp_path / "tripwire", tmp_path / "sbatch_was_run"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ntouch {marker}\necho 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return marker


def launch(capsys, *args: str) -> tuple[int, str, list[str]]:
    """``lcr launch slurm ARGS`` in this process: (exit status, stdout, stderr lines)."""
    code = lcr_main(["launch", "slurm", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def sbatch_options(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S+))?$", script, flags=re.M))


def test_gpu_recipe_script(tmp_path, capsys, no_sbatch):
    out = tmp_path / "run"
    args = [RECIPE, "--out", out, "--nodes", 2, "--rollout-nodes", 1, "--gpus-per-node", 8, "--partition", "gpu",
            "--account", "proj", "--time", "2-00:00:00", "--container", "/images/lcr.sqsh", "--mounts",
            "/data:/data,/models:/models:ro", "--env", "NCCL_SOCKET_IFNAME=ib0", "--dry-run", "trainer.steps=3"]
    code, stdout, err = launch(capsys, *args)
    assert code == 0, err
    script_path = out / "slurm" / "job.sbatch"
    script = script_path.read_text()
    assert stdout == script and not no_sbatch.exists()
    assert sorted(p.name for p in out.iterdir()) == ["slurm"]  # nothing but the script
    subprocess.run(["bash", "-n", str(script_path)], check=True)
    assert sbatch_options(script) == {
        "job-name": "lcr-qwen2.5-7b-dapo", "nodes": "2", "ntasks-per-node": "1", "cpus-per-task": "64",
        "gpus-per-node": "8", "exclusive": "", "mem": "0", "partition": "gpu", "account": "proj",
        "time": "2-00:00:00", "output": f"{out}/slurm/job-%j.log", "open-mode": "append", "requeue": "",
        "signal": "B:USR1@600",
    }
    for line in ("TRAINER_NODES=1", "ROLLOUT_NODES=1", "PROCS_PER_NODE=8", "OVERRIDES=(trainer.steps=3)",
                 f"CONFIG={RECIPE}", "export NCCL_SOCKET_IFNAME=ib0", "export CUDA_DEVICE_MAX_CONNECTIONS=1",
                 "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}", "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600"):
        assert re.search(rf"^{re.escape(line)}(\s|$)", script, flags=re.M), line
    srun = shlex.split(re.search(r"^SRUN=\((.*)\)$", script, flags=re.M).group(1))
    assert {"--ntasks-per-node=1", "--cpus-per-task=64", "--gpus-per-node=8", "--container-image=/images/lcr.sqsh",
            "--container-mounts=/data:/data,/models:/models:ro"} <= set(srun)
    assert "TP=2 PP=2 CP=1 DP=2" in script
    # The header's command writes the same script again.
    command = re.search(r"^#   (lcr launch slurm .*)$", script, flags=re.M).group(1)
    script_path.unlink()
    code, again, err = launch(capsys, *shlex.split(command)[3:], "--dry-run")
    assert code == 0, err
    assert again == script and not no_sbatch.exists()


def test_committed_example_is_current(tmp_path):
    example = EXAMPLE.read_text()
    command = shlex.split(re.search(r"^#   lcr launch slurm (.*)$", example, flags=re.M).group(1))
    out = command[command.index("--out") + 1]
    command[command.index("--out") + 1] = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "tools/launch_slurm.py", *command, "--dry-run"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    subprocess.run(["bash", "-n", str(EXAMPLE)], check=True)
    expected = (example.replace(f"{EXAMPLE_CHECKOUT}/.venv/bin/python", sys.executable)
                .replace(f"{EXAMPLE_CHECKOUT}/{out}", str(tmp_path / "run")).replace(EXAMPLE_CHECKOUT, str(REPO_ROOT))
                .replace(f"--out {out} ", f"--out {tmp_path / 'run'} "))
    assert proc.stdout == expected, "examples/slurm/qwen2.5-7b-dapo.sbatch is stale: regenerate it (its README says how)"


def test_cpu_job_asks_for_no_gpus(tmp_path, capsys, tiny_configs, no_sbatch):
    policy, _ = tiny_configs
    code, script, err = launch(capsys, write_run(tmp_path, policy), "--out", tmp_path / "run", "--gpus-per-node", 0,
                               "--ntasks-per-node", 2, "--dry-run")
    assert code == 0, err
    options = sbatch_options(script)
    assert not {"gpus-per-node", "exclusive", "mem"} & options.keys()
    assert options["cpus-per-task"] == "2"  # one per trainer process
    assert "TP=1 PP=1 CP=1 DP=2" in script and "CUDA_DEVICE_MAX_CONNECTIONS" not in script


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory) -> tuple[Path, Path]:
    """Config and tokenizer (no weights: the checks read config.json) of a policy (4 heads, 2 KV heads)
    and of a teacher with 3 KV heads, which TP=2 cannot split."""
    from transformers import LlamaConfig

    from megatron_lcr.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    dirs = []
    for name, kv_heads in (("policy", 2), ("teacher", 3)):
        path = tmp_path_factory.mktemp("models") / name
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=6 if kv_heads == 3 else 4, num_key_value_heads=kv_heads,
                    max_position_embeddings=512).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(path)
    return tuple(dirs)


def write_run(tmp_path: Path, policy: Path) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["model"]["hf_path"] = str(policy)
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg))
    return path


def refused_port() -> int:
    from megatron_lcr.parallel.env import free_port

    return free_port()  # free a moment ago, and nobody listens on it


BAD = {
    "fewer GPUs than TP x PP": (["--gpus-per-node", 2, "parallel.tp=2", "parallel.pp=2"],
                                "1 trainer node(s) x 2 = 2 GPUs for the policy: world size 2 is not divisible by "
                                "tp(2) x pp(2) x cp(1) = 4"),
    "more GPUs than a multiple of TP x PP": (["--nodes", 2, "--gpus-per-node", 3, "parallel.tp=2", "parallel.pp=2"],
                                             "2 trainer node(s) x 3 = 6 GPUs for the policy: world size 6 is not "
                                             "divisible by tp(2) x pp(2) x cp(1) = 4"),
    "the model cannot take the layout": (["--gpus-per-node", 4, "parallel.tp=4"],
                                         "num_query_groups 2 is not divisible by tp(4)"),
    "rollout node with more GPUs than its servers use": (
        ["--nodes", 2, "--rollout-nodes", 1, "--gpus-per-node", 4, "rollout.server.backend=sglang",
         "rollout.server.tp_size=2"], "rollout.server needs GPUs [0, 1] on each rollout node (1 sglang server(s) x "
                                      "tp_size 2), but the nodes have --gpus-per-node 4"),
    "Megatron teacher on the student's layout": (
        ["--gpus-per-node", 2, "parallel.tp=2", "objective=opd", "distill.teacher.hf_path=TEACHER"],
        "2 GPUs for the Megatron teacher (the student's layout): num_query_groups 3 is not divisible by tp(2)"),
    "Megatron teacher on its own layout": (
        ["--gpus-per-node", 2, "objective=opd", "distill.opd.estimator=full", "distill.teacher.hf_path=TEACHER",
         "distill.teacher.tensor_parallel_size=2"],
        "2 GPUs for the Megatron teacher (its own layout): num_query_groups 3 is not divisible by tp(2)"),
    "teacher servers on trainer GPUs": (
        ["--gpus-per-node", 4, "--ntasks-per-node", 4, "objective=opd", "distill.teacher.hf_path=TEACHER",
         "distill.teacher.scorer=engine", "rl.temperature=1.0", "distill.teacher.engine.server.backend=sglang",
         "distill.teacher.engine.server.gpu_ids=[3]"],
        "teacher server GPUs 3 are also trainer GPUs"),
    "partition with a space": (["--partition", "gpu large"], "--partition 'gpu large' is not a SLURM partition name"),
    "malformed time": (["--time", "1:2:3:4"], "--time '1:2:3:4' is not a SLURM time"),
    "unreachable rollout URL": (["rollout.urls=[http://127.0.0.1:PORT]"],
                                "rollout.urls: http://127.0.0.1:PORT does not answer /health"),
    "rollout nodes and rollout URLs": (["--nodes", 2, "--rollout-nodes", 1, "--no-check-urls",
                                        "rollout.urls=[http://127.0.0.1:PORT]"],
                                       "--rollout-nodes 1 starts servers, but rollout.urls already names 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_nothing_written_or_submitted(case, tmp_path, capsys, tiny_configs, no_sbatch):
    policy, teacher = tiny_configs
    args, message = BAD[case]
    port = str(refused_port())
    args = [str(a).replace("TEACHER", str(teacher)).replace("PORT", port) for a in args]
    out = tmp_path / "run"
    code, stdout, err = launch(capsys, write_run(tmp_path, policy), "--out", out, *args)
    assert code == 1 and stdout == ""
    assert len(err) == 1 and err[0].startswith("lcr: error: "), err
    assert message.replace("PORT", port) in err[0]
    assert not out.exists() and not no_sbatch.exists()


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the stdlib's name
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_answering_rollout_url_passes(tmp_path, capsys, tiny_configs, no_sbatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        code, script, err = launch(capsys, write_run(tmp_path, tiny_configs[0]), "--out", tmp_path / "run",
                                   "--gpus-per-node", 0, "--dry-run", f"rollout.urls=[{url}]")
    finally:
        server.shutdown()
    assert code == 0, err
    assert f"rollout.urls=[{url}]" in script and "given by rollout.urls (1 server(s))" in script
    assert not no_sbatch.exists()
