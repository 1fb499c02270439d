"""Command features built on the rest: the throughput benchmark, attention maps, weights out.

Entry points: `run(cfg, warmup, steps, inputs)` (dino/tools/throughput.py: images/s, step time, MFU and
peak memory of a config's train step, `dinolab bench`); `attention_figure(overrides)` (the last
block's CLS attention per head, `dinolab viz`); `export_backbone(run_dir, out, fmt)` (a run's
teacher backbone as a timm or reference file, `dinolab export`).
"""

from dino import entry_points

__all__, __getattr__, __dir__ = entry_points(
    __name__,
    {
        "run": "dino.tools.throughput",
        "attention_figure": "dino.tools.viz",
        "export_backbone": "dino.tools.export",
    },
)
