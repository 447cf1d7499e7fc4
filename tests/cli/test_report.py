"""What the user reads while and after a run: the model-wide progress bar (blocks done, the
current block's iteration, the time left) and the plot saved beside the checkpoint."""

import math
import xml.etree.ElementTree as ET

from autoround_fast.cli import plot
from autoround_fast import progress
from autoround_fast.progress import ModelProgress


class FakeBar:
    def __init__(self, total, initial):
        self.total, self.n, self.closed, self.desc, self.postfix = total, initial, False, "", {}

    def set_description(self, desc, refresh=True):
        self.desc = desc

    def set_postfix(self, refresh=True, **kw):
        self.postfix = kw

    def update(self, k):
        assert k >= 0
        self.n += k

    def close(self):
        self.closed = True


def test_one_bar_over_every_block_and_iteration(monkeypatch):
    bars = []
    monkeypatch.setattr(progress, "_tqdm", lambda **kw: bars.append(FakeBar(**kw)) or bars[-1])
    p = ModelProgress(blocks=3, iters=4)
    p.skip()  # reloaded by a resumed run: done from the start, not a burst of fast steps
    step = p.start("model.layers.1")
    bar = bars[0]
    assert (bar.total, bar.n, bar.desc) == (12, 4, "AutoRound block 2/3 (model.layers.1)")
    for it in range(4):
        step(it, 1.0 / (it + 1))
    assert bar.n == 8 and bar.postfix == {"loss": "0.25"}
    p.finish_block()
    step = p.start("model.layers.2")
    step(1, 0.5), step(2, 0.4)  # a GPU reports in batches: iterations 0 and 3 never come alone
    assert bar.n == 11 and bar.desc == "AutoRound block 3/3 (model.layers.2)" and not bar.closed
    p.finish_block()
    assert bar.n == 12 and bar.closed and len(bars) == 1


def test_a_last_block_skipped_closes_the_bar(monkeypatch):
    bars = []
    monkeypatch.setattr(progress, "_tqdm", lambda **kw: bars.append(FakeBar(**kw)) or bars[-1])
    p = ModelProgress(blocks=2, iters=4)
    step = p.start("model.layers.0")
    step(3, 0.1)
    p.finish_block()
    p.skip()  # the last block has nothing to tune
    assert bars[0].n == 8 and bars[0].closed

def test_the_plot_puts_each_block_where_its_numbers_say():
    """Lower losses sit lower (larger y), each bar's height is its block's share of the
    slowest; a block without losses (the stock backend) gets its bar and no markers."""
    rows = [dict(block=f"model.layers.{i}", init_loss=a, best_loss=b, seconds=s)
            for i, (a, b, s) in enumerate([(0.02, 0.01, 4.0), (0.5, 0.1, 2.0), (3.0, 2.5, 1.0)])]
    rows.append(dict(block="model.layers.3", init_loss=float("nan"), best_loss=float("nan"), seconds=3.0))
    svg = ET.fromstring(plot.blocks_svg(rows, "t & <title>"))
    ns = "{http://www.w3.org/2000/svg}"
    y = {k: [float(c.get("cy")) for c in svg.iter(f"{ns}circle") if c.get("class") == k] for k in ("init_loss", "best_loss")}
    assert len(y["init_loss"]) == len(y["best_loss"]) == 3
    losses = [(r["init_loss"], r["best_loss"]) for r in rows[:3]]
    flat = [(v, cy) for (a, b), ya, yb in zip(losses, y["init_loss"], y["best_loss"]) for v, cy in ((a, ya), (b, yb))]
    for (v1, y1), (v2, y2) in zip(sorted(flat), sorted(flat)[1:]):  # a larger loss is drawn higher
        assert y2 < y1
    # log scale: a block's drop is drawn as long as the log of its ratio (0.02 -> 0.01, 0.5 -> 0.1)
    drop = [yb - ya for ya, yb in zip(y["init_loss"], y["best_loss"])]
    assert abs(drop[0] / drop[1] - math.log(2) / math.log(5)) < 1e-3
    heights = [float(r.get("height")) for r in svg.iter(f"{ns}rect") if r.get("class") == "seconds"]
    assert [round(h / heights[0], 6) for h in heights] == [1.0, 0.5, 0.25, 0.75]
    assert any(t.text == "t & <title>" for t in svg.iter(f"{ns}text"))
