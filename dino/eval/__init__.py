"""Evaluation protocols on checkpoints of a run: weighted k-NN and the linear probe (DINO's).

`features` resolves what is evaluated (a complete checkpoint's teacher backbone, or a baseline)
and caches its features as shards under `<run>/eval/features/`; `knn` and `linear` are the protocols.
Each writes a JSON result under `<run>/eval/<protocol>/` that records the checkpoint path, step and
config hash it used.
"""
