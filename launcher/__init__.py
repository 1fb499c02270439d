"""dinolab's launcher: the `dinolab` command line, and (to come) sweeps on submitit/SLURM."""
