"""Experiment tracking behind a small interface; `NullTracker` when tracking is off or not rank 0."""

from __future__ import annotations

from typing import Any, Protocol

from dino.config import DinoConfig


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Accepts everything, records nothing."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def build_tracker(cfg: DinoConfig, is_main: bool) -> Tracker:
    """The tracker of this process. Only `NullTracker` exists so far (tracking.uri is not used yet)."""
    return NullTracker()
