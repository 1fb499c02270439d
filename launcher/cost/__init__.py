"""What a sweep will cost before it is queued: GPU-hours, wall-clock, memory, the budget.

Two modules, one idea each:

- `launcher.cost.sweep_cost`: the estimate and its budget: the cost records (`SweepCost`, `RunCost`,
  `StageCost`), the images each stage processes, the card and GPUs of a stage, `estimate` itself, and
  what the commands show of it (`cost_table`, `summary_lines`, `gpu_hours_text`, `check_budget`,
  `record_fields`).
- `launcher.cost.speeds`: where a speed comes from: measured in MLflow, calibrated by
  `dinolab bench --save` (`save_bench`), estimated from FLOPs; `Speed` and the run's shape.
  It imports nothing of `sweep_cost`, which imports it.

The entry points are re-exported here: `from launcher import cost; cost.estimate(sweep, runs)`. Importing this package loads
neither torch, Hydra, MLflow, pandas nor timm: `sweep status` and `plan` stay fast
(tests/unit/test_layers.py).
"""

from launcher.cost.speeds import Speed, save_bench
from launcher.cost.sweep_cost import (
    BudgetExceeded,
    RunCost,
    StageCost,
    SweepCost,
    check_budget,
    cost_table,
    estimate,
    gpu_hours_text,
    record_fields,
    summary_lines,
)

__all__ = [
    "BudgetExceeded",
    "RunCost",
    "Speed",
    "StageCost",
    "SweepCost",
    "check_budget",
    "cost_table",
    "estimate",
    "gpu_hours_text",
    "record_fields",
    "save_bench",
    "summary_lines",
]
