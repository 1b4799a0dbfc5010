"""A tqdm progress bar for training runs started from the command line."""

from tqdm import tqdm


class TqdmProgress:
    """One bar per epoch with the running loss; a line with train/val loss when an epoch ends."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.total_epochs, self.steps = 0, 0

    def on_start(self, total_epochs: int, steps_per_epoch: int) -> None:
        self.total_epochs, self.steps = total_epochs, steps_per_epoch

    def on_step(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        if self.bar is None:
            self.bar = tqdm(total=self.steps, desc=f"epoch {epoch + 1}/{self.total_epochs}", unit="step", leave=False)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}")

    def on_epoch_end(self, result) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        val = f", val loss {result.val['loss']:.4f}" if "loss" in result.val else ""
        tqdm.write(f"epoch {result.epoch + 1}/{self.total_epochs}: train loss {result.train['loss']:.4f}{val}")
