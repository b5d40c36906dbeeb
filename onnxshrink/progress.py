"""Progress on a terminal: a bar over the pipeline's passes, and sub-tasks with ETA for long work
inside a pass (``ShrinkPass.task``), drawn by rich and removed when done.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxshrink.passes.base import NullTask
from onnxshrink.pipeline import Instrument, PassRun

__all__ = ["Progress"]


class Progress(Instrument):
    """A progress bar over the passes, and sub-tasks for long work, on a terminal only."""

    def __init__(self, console=None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = console
        self._progress = None

    def enter(self, model: ir.Model) -> None:
        if not self.enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import (
            Progress as RichProgress,
        )

        self._progress = RichProgress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._progress.start()
        self._main = None

    def task(self, description: str, total: int | None):
        """Starts a sub-task; returns ``advance(n)`` (and ``done()`` via ``advance.done``)."""
        if self._progress is None:
            return NullTask()
        tid = self._progress.add_task(description, total=total)
        return _Task(self._progress, tid)

    def before_pass(self, run: PassRun) -> None:
        if self._progress is None:
            return
        if self._main is None:
            self._main = self._progress.add_task("passes", total=run.total)
        self._progress.update(
            self._main, description=f"pass {run.index + 1}/{run.total}: {run.pass_.name}"
        )

    def after_pass(self, run: PassRun) -> None:
        if self._progress is not None:
            self._progress.advance(self._main)

    def exit(self, model: ir.Model) -> None:
        self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class _Task:
    def __init__(self, progress, tid) -> None:
        self._p, self._tid = progress, tid

    def __call__(self, n: int = 1) -> None:
        self._p.advance(self._tid, n)

    def done(self) -> None:
        self._p.remove_task(self._tid)
