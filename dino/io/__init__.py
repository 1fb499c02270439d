"""Edges to the outside world: files (local and s3://), checkpoints, the run lock, MLflow, the
process group, weights files of other formats.

Entry points: the `storage` module (every file read and write, local or s3://); `load_latest` and
`CheckpointWriter` (checkpoints); `RunLock` (one writer per run folder); `build_tracker` and
`open_run_tracker` (MLflow); `setup` (the rank's device and process group); `read` (a weights file of
any known format).
"""

from dino import entry_points

__all__, __getattr__, __dir__ = entry_points(
    __name__,
    {
        "load_latest": "dino.io.checkpoint",
        "CheckpointWriter": "dino.io.checkpoint",
        "RunLock": "dino.io.run_lock",
        "build_tracker": "dino.io.mlflow_tracker",
        "open_run_tracker": "dino.io.mlflow_tracker",
        "setup": "dino.io.distributed",
        "read": "dino.io.weights",
    },
)
