"""dinolab's launcher: the `dinolab` command line, sweeps on submitit/SLURM, their records, status and cost."""
