"""``lcr launch slurm``: turn an ``lcr train`` config into a SLURM job (checked, written, submitted).

``config.py`` holds the job's shape (:class:`SlurmLaunchConfig`), ``plan.py`` checks it against the run
config before anything is written (layout, GPUs, rollout and teacher servers), ``sbatch.py`` renders
the script, ``submit.py`` writes and submits it, ``commands.py`` is the command line. Preemption inside
the trainer is ``megatron_lcr.train.preemption``.
"""
