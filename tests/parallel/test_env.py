"""megatron_lcr.parallel.env: launcher variables -> DistEnv, SLURM syntax, real gloo rendezvous."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from megatron_lcr.parallel.env import (
    DistEnv,
    expand_slurm_hostlist,
    init_process_group,
    parse_slurm_tasks_per_node,
    read_dist_env,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# --- SLURM host lists (expected values checked with `scontrol show hostnames`, SLURM 22.05) ---


@pytest.mark.parametrize(
    "spec, hosts",
    [
        ("login1", ["login1"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        (
            "node[01-03,07],gpu-a[1-2]-ib,login1",
            ["node01", "node02", "node03", "node07", "gpu-a1-ib", "gpu-a2-ib", "login1"],
        ),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("n[0-1]x[2-3]", ["n0x2", "n0x3", "n1x2", "n1x3"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("n[1-03]", ["n1", "n2", "n3"]),
        ("n[01-02,5-06]", ["n01", "n02", "n5", "n6"]),
        ("x[5]", ["x5"]),
        ("n1,m[01-02]-x[1-2]", ["n1", "m01-x1", "m01-x2", "m02-x1", "m02-x2"]),
        ("a,,b", ["a", "b"]),
        ("", []),
    ],
)
def test_expand_slurm_hostlist(spec, hosts):
    assert expand_slurm_hostlist(spec) == hosts


@pytest.mark.parametrize(
    "spec, message",
    [
        ("n[3-1]", "descending range '3-1'"),
        ("n[a-b]", "bad range 'a-b'"),
        ("n[]", "bad range ''"),
        ("n[1-2", "unclosed '\\['"),
        ("n[1-2]]", "unmatched '\\]'"),
        ("n[[1-2]]", "nested '\\['"),
    ],
)
def test_expand_slurm_hostlist_rejects_malformed(spec, message):
    with pytest.raises(ValueError, match=message):
        expand_slurm_hostlist(spec)


@pytest.mark.parametrize(
    "spec, counts",
    [("8", [8]), ("4(x2)", [4, 4]), ("2,1", [2, 1]), ("4(x2),3", [4, 4, 3]), ("1(x3)", [1, 1, 1])],
)
def test_parse_slurm_tasks_per_node(spec, counts):
    assert parse_slurm_tasks_per_node(spec) == counts


@pytest.mark.parametrize("spec", ["4(y2)", "x", "0", "4,", "4(x)"])
def test_parse_slurm_tasks_per_node_rejects_malformed(spec):
    with pytest.raises(ValueError, match="bad tasks-per-node entry"):
        parse_slurm_tasks_per_node(spec)


# --- read_dist_env: precedence and values ---

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "1234",
}
SLURM = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_JOB_ID": "1234567",
    "SLURM_STEP_ID": "0",
}


def test_torchrun_variables():
    assert read_dist_env(TORCHRUN) == DistEnv(
        rank=3,
        world_size=8,
        local_rank=1,
        local_world_size=2,
        master_addr="10.0.0.1",
        master_port=1234,
        launcher="torchrun",
    )


def test_torchrun_wins_over_slurm():
    # torchrun inside srun: both sets present; the worker processes are torchrun's.
    assert read_dist_env({**SLURM, **TORCHRUN}) == read_dist_env(TORCHRUN)


def test_hand_set_rank_without_local_vars_is_one_node():
    env = read_dist_env({"RANK": "1", "WORLD_SIZE": "2"})
    assert (env.local_rank, env.local_world_size) == (1, 2)
    assert (env.master_addr, env.master_port) == ("127.0.0.1", 29500)


def test_slurm_variables():
    # Task 5 of 8, four per node on gpu07/gpu08; port 20000 + 1234567 % 10000 = 24567.
    assert read_dist_env(SLURM) == DistEnv(
        rank=5,
        world_size=8,
        local_rank=1,
        local_world_size=4,
        master_addr="gpu07",
        master_port=24567,
        launcher="slurm",
    )


@pytest.mark.parametrize("job_id, port", [("9999", 29999), ("10000", 20000), ("42", 20042)])
def test_slurm_port_is_derived_from_job_id_only(job_id, port):
    ports = {
        read_dist_env(
            {**SLURM, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % 4), "SLURM_JOB_ID": job_id}
        ).master_port
        for r in range(8)
    }
    assert ports == {port}


def test_slurm_master_port_and_addr_from_env_win():
    env = read_dist_env({**SLURM, "MASTER_PORT": "31000", "MASTER_ADDR": "gpu07-ib"})
    assert (env.master_addr, env.master_port) == ("gpu07-ib", 31000)


def test_slurm_node_list_precedence():
    step = {**SLURM, "SLURM_STEP_NODELIST": "gpu[08]", "SLURM_NODELIST": "x1"}
    assert read_dist_env(step).master_addr == "gpu08"
    no_job = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}
    assert read_dist_env({**no_job, "SLURM_NODELIST": "cn[3-4]"}).master_addr == "cn3"


def test_slurm_tasks_per_node_sources():
    assert read_dist_env({**SLURM, "SLURM_NTASKS_PER_NODE": "2"}).local_world_size == 2
    assert read_dist_env({**SLURM, "SLURM_STEP_TASKS_PER_NODE": "2(x4)"}).local_world_size == 2
    # Uneven "4(x2),3" (11 tasks): the third node (SLURM_NODEID=2) runs 3.
    uneven = {**SLURM, "SLURM_NTASKS": "11", "SLURM_PROCID": "9", "SLURM_TASKS_PER_NODE": "4(x2),3"}
    assert read_dist_env({**uneven, "SLURM_NODEID": "2"}).local_world_size == 3
    with pytest.raises(ValueError, match="SLURM_NODEID is missing"):
        read_dist_env(uneven)


def test_slurm_without_tasks_per_node_splits_evenly_over_nodes():
    base = {k: v for k, v in SLURM.items() if k != "SLURM_TASKS_PER_NODE"}
    assert read_dist_env(base).local_world_size == 4  # 8 tasks over gpu07, gpu08
    one_node = {**base, "SLURM_JOB_NODELIST": "localhost"}
    assert read_dist_env(one_node).local_world_size == 8
    with pytest.raises(ValueError, match="SLURM_NTASKS=8 does not split evenly over 3 nodes"):
        read_dist_env({**base, "SLURM_JOB_NODELIST": "n[1-3]"})


# What `env` printed inside an `sbatch -n 2` script (SLURM 22.05), outside any srun step.
SBATCH_SCRIPT = {
    "SLURM_JOB_ID": "2",
    "SLURM_JOB_NODELIST": "vm",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "vm",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "0",
    "SLURM_TASKS_PER_NODE": "2",
}


def test_sbatch_script_without_srun_is_rejected():
    with pytest.raises(ValueError, match="SLURM_NTASKS=2 but SLURM_STEP_ID is missing"):
        read_dist_env(SBATCH_SCRIPT)
    one_task = {**SBATCH_SCRIPT, "SLURM_NTASKS": "1", "SLURM_TASKS_PER_NODE": "1"}
    assert read_dist_env(one_task).world_size == 1


def test_single_process_defaults():
    assert read_dist_env({}) == DistEnv(
        rank=0,
        world_size=1,
        local_rank=0,
        local_world_size=1,
        master_addr="127.0.0.1",
        master_port=29500,
        launcher="single",
    )
    assert read_dist_env({"MASTER_PORT": "4321"}).master_port == 4321


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 must be < WORLD_SIZE=2"),
        ({"RANK": "0"}, "RANK='0' is set but WORLD_SIZE is missing"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE='2' is set but RANK is missing"),
        ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK='-1' must be >= 0"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE='0' must be >= 1"),
        ({**TORCHRUN, "LOCAL_RANK": "2"}, "LOCAL_RANK=2 must be < LOCAL_WORLD_SIZE=2"),
        ({**TORCHRUN, "LOCAL_WORLD_SIZE": "9"}, "LOCAL_WORLD_SIZE=9 is larger than WORLD_SIZE=8"),
        ({**TORCHRUN, "MASTER_PORT": "http"}, "MASTER_PORT='http' is not an integer"),
        ({**SLURM, "SLURM_PROCID": "8"}, "SLURM_PROCID=8 must be < SLURM_NTASKS=8"),
        ({"SLURM_PROCID": "0"}, "SLURM_PROCID='0' is set but SLURM_NTASKS is missing"),
        ({**SLURM, "SLURM_JOB_ID": "12_3"}, "SLURM_JOB_ID='12_3' is not an integer"),
        ({**SLURM, "SLURM_LOCALID": "4"}, "SLURM_LOCALID=4 must be < tasks on this node=4"),
        ({**SLURM, "SLURM_TASKS_PER_NODE": "4(y2)"}, "SLURM_TASKS_PER_NODE='4\\(y2\\)' is not"),
        ({**SLURM, "SLURM_JOB_NODELIST": "gpu[2-1]"}, "descending range '2-1'"),
    ],
)
def test_inconsistent_variables_raise(environ, message):
    with pytest.raises(ValueError, match=message):
        read_dist_env(environ)


def test_dist_env_rejects_inconsistent_fields():
    fields = dict(
        local_rank=0, local_world_size=1, master_addr="h", master_port=1, launcher="single"
    )
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        DistEnv(rank=2, world_size=2, **fields)
    with pytest.raises(ValueError, match="master_port 70000"):
        DistEnv(rank=0, world_size=1, **{**fields, "master_port": 70000})


# --- init_process_group ---


def test_single_process_group_is_idempotent_and_checks_world_size():
    env = read_dist_env({})
    try:
        init_process_group(env, backend="gloo", timeout_s=30)
        init_process_group(env, backend="gloo", timeout_s=30)  # second call: no-op
        assert (dist.get_rank(), dist.get_world_size(), dist.get_backend()) == (0, 1, "gloo")
        other = DistEnv(
            rank=0,
            world_size=2,
            local_rank=0,
            local_world_size=2,
            master_addr="127.0.0.1",
            master_port=29500,
            launcher="slurm",
        )
        with pytest.raises(RuntimeError, match="world size 1 rank 0, but env says world size 2"):
            init_process_group(other)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


WORKER = """
import json, os, sys
import torch
import torch.distributed as dist
from megatron_lcr.parallel.env import init_process_group, read_dist_env

env = read_dist_env(os.environ)
init_process_group(env, backend="gloo", timeout_s=60)
init_process_group(env, backend="gloo", timeout_s=60)  # idempotent
total = torch.tensor([env.rank])
dist.all_reduce(total)
result = dict(rank=env.rank, world_size=dist.get_world_size(), launcher=env.launcher,
              local_rank=env.local_rank, master_port=env.master_port, sum=int(total))
with open(os.path.join(sys.argv[1], f"rank{env.rank}.json"), "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
"""

LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def _clean_env() -> dict[str, str]:
    """This process's environment minus any launcher's variables, with the repo importable."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCHER_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _results(out_dir: Path, world_size: int) -> list[dict]:
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world_size)]


@pytest.mark.dist
def test_torchrun_two_ranks_all_reduce(tmp_path, free_port):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port}",
        str(script),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for r, res in enumerate(_results(tmp_path, 2)):
        assert res == dict(
            rank=r, world_size=2, launcher="torchrun", local_rank=r, master_port=free_port, sum=1
        )


def _free_port_in_slurm_range() -> int:
    """A currently free port in [20000, 29999], where SLURM_JOB_ID-derived ports land."""
    for port in range(20000 + os.getpid() % 5000, 30000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-29999")


@pytest.mark.dist
def test_slurm_variables_two_ranks_all_reduce(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port_in_slurm_range()
    job_id = 7_770_000 + port - 20000  # derived port: 20000 + job_id % 10000 == port
    procs = []
    for rank in range(2):
        env = {
            **_clean_env(),
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": str(rank),
            "SLURM_JOB_NODELIST": "localhost",
            "SLURM_JOB_ID": str(job_id),
            "SLURM_STEP_ID": "0",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(tmp_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:  # a rank stuck in rendezvous must not outlive the test
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    for r, res in enumerate(_results(tmp_path, 2)):
        assert res == dict(
            rank=r, world_size=2, launcher="slurm", local_rank=r, master_port=port, sum=1
        )


# --- addresses: which reach other nodes, and at which of ours they reach us ---


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True), ("127.3.2.1", True), ("localhost", True), ("LocalHost.", True),
        ("api.localhost", True), ("::1", True), ("[::1]", True), ("::ffff:127.0.0.1", True),
        ("0.0.0.0", True), ("::", True),
        ("10.0.0.5", False), ("192.0.2.10", False), ("2001:db8::1", False), ("gpu07-ib", False),
        ("localhost-2", False), ("128.0.0.1", False),
    ],
)
def test_is_loopback_reads_the_address_as_written(host, loopback):
    from megatron_lcr.parallel.env import is_loopback

    assert is_loopback(host) is loopback


def test_routable_address_is_an_address_of_this_host_or_none():
    from megatron_lcr.parallel.env import free_port, routable_address

    assert routable_address("127.0.0.1") == "127.0.0.1"
    # A UDP connect to the broadcast address is refused (EACCES without SO_BROADCAST): no address.
    assert routable_address("255.255.255.255") is None
    # A documentation address: no packet is sent; a machine without a default route has no answer.
    got = routable_address("192.0.2.10", 30000)
    if got is not None:
        assert free_port(got) > 0  # we can bind it: it is one of this host's addresses
