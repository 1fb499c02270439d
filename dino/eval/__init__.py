"""Evaluation protocols on checkpoints of a run: weighted k-NN and the linear probe (DINO's).

`target` resolves what is evaluated (a complete checkpoint's teacher backbone, a weights file, or a
baseline); `datasets` gives the evaluation splits and transform, `encoders` turns images into
features and `features` caches them as shards under `<run>/eval/features/`. `knn` and `linear` (with
`probe`, the probe's parts) are the protocols: each writes a JSON result under
`<run>/eval/<protocol>/` that records the checkpoint path, step and config hash it used, and logs
it to the run's MLflow run (`track`). `results` names what they produce and reads results back.
"""
