"""Training data: datasets, webdataset shards, unreadable images, the train loader."""
