"""Evaluation protocols on frozen backbones: weighted k-NN and the linear probe (DINO's), and the
live k-NN monitor of pretraining.

Entry points: `run_knn(overrides)`, `run_linear(overrides)` (each writes a JSON result under
`<run>/eval/<protocol>/` and logs it to the run's MLflow run); `resolve` (what an override list
evaluates: a checkpoint's teacher, a weights file, a baseline); `KnnMonitor`; `read_results`.
`evaluated` resolves the network, `splits` gives the evaluation splits and transform, `encoders` turns
images into features and `features` caches them; `probe` holds the linear probe's parts; `results`
names what the protocols produce.
"""

from dino import entry_points

__all__, __getattr__, __dir__ = entry_points(
    __name__,
    {
        "run_knn": "dino.eval.knn",
        "run_linear": "dino.eval.linear",
        "resolve": "dino.eval.evaluated",
        "KnnMonitor": "dino.eval.monitor",
        "read_results": "dino.eval.results",
    },
)
