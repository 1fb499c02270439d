"""Training data: datasets, webdataset shards, unreadable images, a run's batches.

Entry points: `TrainData` (a run's batches on the training device, one per global step),
`build_dataset` (the source a config names), `pack` (a dataset written as webdataset shards).
"""

from dino import entry_points

__all__, __getattr__, __dir__ = entry_points(
    __name__,
    {
        "TrainData": "dino.data.train_data",
        "build_dataset": "dino.data.train_data",
        "pack": "dino.data.shards",
    },
)
