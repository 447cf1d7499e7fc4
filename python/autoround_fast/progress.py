"""One progress bar over a whole model's tuning: the blocks done of all, the current block's
iteration and loss, and the time left (tqdm's estimate from the iterations' rate)."""

from __future__ import annotations

from typing import Callable


class ModelProgress:
    """A bar of ``blocks * iters`` steps, made at the first block that is tuned: blocks that
    an earlier run finished before it count as done from the start; a block skipped later (no
    Linear to tune) moves the bar at once."""

    def __init__(self, blocks: int, iters: int):
        self.blocks, self.iters = blocks, iters
        self.done = 0  # blocks finished or reloaded
        self.bar = None

    def skip(self) -> None:
        """A block reloaded or with nothing to tune."""
        self.finish_block()

    def start(self, name: str) -> Callable[[int, float], None]:
        """The per-iteration callback for the block ``name``, tuned now."""
        if self.bar is None:
            self.bar = _tqdm(total=self.blocks * self.iters, initial=self.done * self.iters)
        self.bar.set_description(f"AutoRound block {self.done + 1}/{self.blocks} ({name})", refresh=False)
        first = self.done * self.iters

        def step(it: int, loss: float) -> None:
            self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)  # shown with this iteration
            self.bar.update(first + it + 1 - self.bar.n)

        return step

    def finish_block(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.done * self.iters - self.bar.n)
            if self.done == self.blocks:
                self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _tqdm(**kwargs):
    from tqdm.auto import tqdm

    return tqdm(unit="it", dynamic_ncols=True, **kwargs)
