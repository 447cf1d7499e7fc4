"""One progress bar over a whole model's tuning: the blocks done of all, the current block's
iteration and loss, and the time left (tqdm's estimate from the iterations' rate)."""

from __future__ import annotations

from typing import Callable, Optional


class ModelProgress:
    """A bar of ``blocks * iters`` steps, made at the first block that is tuned (blocks that
    an earlier run finished count as done from the start, not as fast steps)."""

    def __init__(self, blocks: int, iters: int, make_bar: Optional[Callable] = None):
        self.blocks, self.iters = blocks, iters
        self.done = 0  # blocks finished or reloaded
        self._make_bar = make_bar or _tqdm
        self.bar = None

    def skip(self) -> None:
        """A block reloaded instead of tuned."""
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.iters)

    def start(self, name: str) -> Callable[[int, float], None]:
        """The per-iteration callback for the block ``name``, tuned now."""
        if self.bar is None:
            self.bar = self._make_bar(total=self.blocks * self.iters, initial=self.done * self.iters)
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
