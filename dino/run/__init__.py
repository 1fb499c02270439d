"""One training run: set-up, the loop, its state, metrics, progress, distributed, accelerators."""
