"""Progress on stderr for long commands: tqdm bars when stderr is a terminal, plain lines otherwise,
nothing with `--quiet`. stdout stays for the command's report (tests and pipes parse it)."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

QUIET = False
"""Set by `bioembed --quiet`: no bars, no progress lines (errors still go to stderr)."""


def bars_enabled(stream: TextIO | None = None) -> bool:
    """Draw bars only for a person watching: stderr is a terminal and `--quiet` is off."""
    stream = stream or sys.stderr
    return not QUIET and hasattr(stream, "isatty") and stream.isatty()


def say(message: str) -> None:
    """A progress line on stderr (above any bar), unless `--quiet`."""
    if not QUIET:
        tqdm.write(message, file=sys.stderr)


class StageProgress:
    """A `log` callable for the pipeline's runs (`dagster_project.demo`): each message goes to stderr
    above one bar that counts finished plates (messages starting with `unit_prefix`, as `materialize_home`
    logs them) out of `total` (None: unknown)."""

    def __init__(self, total: int | None, desc: str = "plates", unit_prefix: str = "  plate ") -> None:
        self.unit_prefix = unit_prefix
        self.bar = tqdm(total=total, desc=desc, unit="plate", file=sys.stderr, disable=not bars_enabled(),
                        leave=False, dynamic_ncols=True)

    def __call__(self, message: str) -> None:
        say(message)
        if message.startswith(self.unit_prefix):
            self.bar.update(1)
            if self.bar.total is not None and self.bar.n >= self.bar.total:
                self.bar.close()  # the cross-plate stages log lines of their own

    def close(self) -> None:
        self.bar.close()


class TqdmProgress:
    """Training: one bar per epoch with the running loss; a line with train/val loss when an epoch ends."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.total_epochs, self.steps = 0, 0

    def on_start(self, total_epochs: int, steps_per_epoch: int) -> None:
        self.total_epochs, self.steps = total_epochs, steps_per_epoch

    def on_step(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        if self.bar is None:
            self.bar = tqdm(total=self.steps, desc=f"epoch {epoch + 1}/{self.total_epochs}", unit="step", leave=False,
                            file=sys.stderr, disable=not bars_enabled(), dynamic_ncols=True)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    def on_epoch_end(self, result) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        val = f", val loss {result.val['loss']:.4f}" if "loss" in result.val else ""
        say(f"epoch {result.epoch + 1}/{self.total_epochs}: train loss {result.train['loss']:.4f}{val}")
