"""``lcr launch slurm CONFIG --out DIR [...] [key=value ...]``: check, write and submit the job."""

from __future__ import annotations

import argparse
import sys

from megatron_lcr.launch.config import SlurmLaunchConfig


def launch_config(args: argparse.Namespace) -> SlurmLaunchConfig:
    return SlurmLaunchConfig(
        config=args.config, out=args.out, overrides=list(args.overrides), nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, ntasks_per_node=args.ntasks_per_node, cpus_per_node=args.cpus_per_node,
        rollout_nodes=args.rollout_nodes, partition=args.partition, account=args.account, time=args.time,
        job_name=args.job_name, container=args.container,
        mounts=[m for m in (args.mounts or "").split(",") if m], signal_lead_s=args.signal_lead,
        python=args.python, env=list(args.env or []), check_urls=args.check_urls)


def _slurm(args: argparse.Namespace) -> None:
    from megatron_lcr.config import load_config
    from megatron_lcr.launch.plan import plan_job
    from megatron_lcr.launch.sbatch import render_sbatch
    from megatron_lcr.launch.submit import submit, write_script
    from megatron_lcr.train.rl.config import RLRunConfig

    launch = launch_config(args)
    plan = plan_job(launch, load_config(RLRunConfig, launch.config, launch.overrides))
    text = render_sbatch(launch, plan)
    path = write_script(launch.out, text)  # nothing is written before every check has passed
    if args.dry_run:
        print(text, end="")
        print(f"lcr launch: wrote {path} (not submitted)", file=sys.stderr)
        return
    job = submit(path)
    print(f"lcr launch: {plan.summary()}\nlcr launch: submitted {path} as job {job}; logs in {path.parent}",
          file=sys.stderr)
    print(job)


def add_parser(sub) -> None:
    """``lcr launch slurm``."""
    launch = sub.add_parser("launch", help="run an lcr train config as a SLURM job (checked, written, submitted)",
                            description="Turn a run config into a cluster job.")
    kind = launch.add_subparsers(dest="scheduler", required=True, metavar="SCHEDULER")
    slurm = kind.add_parser(
        "slurm", help="write OUT/slurm/job.sbatch and submit it with sbatch (prints the job id)",
        description="Check the layout, GPUs and servers against the run config, write a readable sbatch script to "
                    "OUT/slurm/job.sbatch and submit it. Trainer: torchrun on the first nodes; rollout servers "
                    "(lcr rollout-servers) on the last --rollout-nodes. SLURM warns the job --signal-lead seconds "
                    "before its time limit: the trainer checkpoints, the job requeues and resumes. Submitting the "
                    "same command again also resumes.")
    slurm.add_argument("config", help="lcr train YAML config (e.g. examples/depo/qwen2.5-7b-dapo.yaml)")
    slurm.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the run config")
    slurm.add_argument("--out", required=True, help="run directory (the script and logs go to OUT/slurm/)")
    slurm.add_argument("--nodes", type=int, default=1, help="nodes, trainer and rollout together (default 1)")
    slurm.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8; 0: CPU nodes, gloo)")
    slurm.add_argument("--ntasks-per-node", type=int, default=None,
                       help="trainer processes per trainer node (default: one per GPU the servers rank 0 launches "
                            "leave free; CPU nodes: 1)")
    slurm.add_argument("--cpus-per-node", type=int, default=None,
                       help="CPUs of each node's task (default: 8 per GPU; CPU nodes: one per trainer process)")
    slurm.add_argument("--rollout-nodes", type=int, default=0,
                       help="nodes of their own for the rollout servers (default 0: the config's servers are "
                            "launched by trainer rank 0, or given by rollout.urls)")
    slurm.add_argument("--partition", default="", help="SLURM partition (default: the cluster's default)")
    slurm.add_argument("--account", default="", help="SLURM account (default: yours)")
    slurm.add_argument("--time", default="48:00:00", help="time limit, SLURM format (default 48:00:00)")
    slurm.add_argument("--job-name", default="", help="job name (default: lcr-CONFIG_NAME)")
    slurm.add_argument("--container", default="", help="container image for every task (pyxis --container-image)")
    slurm.add_argument("--mounts", default="", help="container mounts SRC:DST[:FLAGS],... (pyxis --container-mounts)")
    slurm.add_argument("--signal-lead", type=int, default=600,
                       help="seconds before the time limit the job is warned (SIGUSR1) to checkpoint and requeue "
                            "(default 600: longer than a step plus a checkpoint)")
    slurm.add_argument("--python", default="", help="Python on the nodes (default: this one; 'python' in a container)")
    slurm.add_argument("--env", action="append", metavar="KEY=VALUE",
                       help="more environment for every task, e.g. --env NCCL_SOCKET_IFNAME=ib0 (repeatable)")
    slurm.add_argument("--no-check-urls", dest="check_urls", action="store_false",
                       help="do not probe rollout.urls / the teacher's URLs from here (only compute nodes reach them)")
    slurm.add_argument("--dry-run", action="store_true", help="write the script and print it; do not submit")
    slurm.set_defaults(func=_slurm)
