"""Configuration: the plain schema, its validation, composition, run identity, the one override parser.

Entry points: `compose(overrides)` -> a validated `DinoConfig` (presets, then `key=value` overrides);
`DinoConfig` and `ConfigError` (the schema, one docstring per field); `to_dict`/`from_dict` (any config
dataclass as a plain dict and back); `config_hash` (a run's id, from the keys that can change its
result).
"""

from dino import entry_points

__all__, __getattr__, __dir__ = entry_points(
    __name__,
    {
        "compose": "dino.config.compose",
        "DinoConfig": "dino.config.schema",
        "ConfigError": "dino.config.schema",
        "to_dict": "dino.config.schema",
        "from_dict": "dino.config.schema",
        "config_hash": "dino.config.identity",
    },
)
