"""After a Hydra multirun of `mode=replay`: one figure that puts the runs side by side.

Hydra calls `SweepFigure.on_multirun_end` (conf/config.yaml lists it under hydra.callbacks); by
hand: `python -m framework.replay.sweep <sweep folder>`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback


def draw_sweep(folder: str | Path) -> Path | None:
    """The sweep figure of the run documents below `folder` (None when it holds none)."""
    from framework.replay.figures import SWEEP_FIGURE_NAME, sweep_figure
    from framework.replay.report import read_reports

    documents = read_reports(Path(folder))
    if not documents:
        return None
    return sweep_figure(documents, Path(folder) / SWEEP_FIGURE_NAME)


class SweepFigure(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        if config.get("mode") != "replay":
            return
        path = draw_sweep(config.replay.out or config.hydra.sweep.dir)  # where the jobs wrote their reports
        if path is not None:
            print(f"[framework] sweep figure {path}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m framework.replay.sweep <sweep folder>")
    print(draw_sweep(sys.argv[1]) or f"no replay.json below {sys.argv[1]}")
