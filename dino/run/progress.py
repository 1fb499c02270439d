"""Console output of the train loop: a rich progress bar on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import contextlib
import logging
import sys
import time

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dino.io.storage import AppendLog, WriteError

log = logging.getLogger("dino.train")


class _RunLogHandler(logging.Handler):
    """Log lines appended whole to the run's train.log; a line that cannot be written (no space
    left) is kept as the log's `failure`, which the train loop raises (a handler must not)."""

    def __init__(self, run_log: AppendLog) -> None:
        super().__init__()
        self.run_log = run_log

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(WriteError):  # kept in run_log.failure
            self.run_log.append(self.format(record) + "\n")


def setup_logging(run_log: AppendLog | None = None) -> None:
    """INFO to stderr and, for a training run, to its train.log."""
    root = logging.getLogger("dino")
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    for handler in list(root.handlers):
        if getattr(handler, "_dinolab", False):
            root.removeHandler(handler)
            handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_log is not None:
        handlers.append(_RunLogHandler(run_log))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._dinolab = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False


class TrainProgress:
    """Step, epoch, loss, lr, img/s and ETA; a live bar only when stdout is a terminal."""

    def __init__(self, start_step: int, end_step: int, steps_per_epoch: int, enabled: bool) -> None:
        self.end_step, self.steps_per_epoch = end_step, steps_per_epoch
        self.bar: Progress | None = None
        if enabled and sys.stdout.isatty():
            self.bar = Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("train", total=end_step, completed=start_step, info="")
            self.bar.start()
        self.started = time.monotonic()
        self.start_step = start_step

    def update(self, step: int, metrics: dict[str, float]) -> None:
        epoch = step / self.steps_per_epoch
        info = (
            f"epoch {epoch:.2f} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
            f"img/s {metrics['img_per_s']:.1f}"
        )
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        else:
            done = step - self.start_step
            rate = done / max(time.monotonic() - self.started, 1e-9)
            eta = (self.end_step - step) / rate if rate > 0 else float("inf")
            log.info("step %d/%d %s eta %s", step, self.end_step, info, _format_eta(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _format_eta(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
