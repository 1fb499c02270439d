"""Configuration: the plain schema, its validation, Hydra composition, run identity, overrides."""
