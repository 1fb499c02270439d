"""Edges to the outside world: files (local and s3://), checkpoints, the run lock, MLflow."""
