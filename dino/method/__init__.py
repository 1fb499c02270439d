"""The DINO method: tensors in, tensors out (no I/O, no Hydra, nothing of the run)."""
