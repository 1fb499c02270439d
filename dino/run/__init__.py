"""One pretraining run: set-up, the loop, its state, metrics, progress, accelerators.

Entry point: `run(cfg, should_stop, on_progress, on_start)` (dino/run/train.py) trains or resumes the
run a config describes and returns a `TrainResult`; `build_run` makes a fresh run's state
(benchmarks use it without the loop).
"""

from dino import entry_points

__all__, __getattr__, __dir__ = entry_points(
    __name__,
    {
        "run": "dino.run.train",
        "TrainResult": "dino.run.loop",
        "build_run": "dino.run.build",
    },
)
