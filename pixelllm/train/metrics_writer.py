"""Where a training run's numbers go: a console progress bar, TensorBoard event files and a
JSON-lines file in the workdir.

The progress bar (tqdm) shows the step, the ETA, the total loss and examples/s. Every logged
step writes its scalars to ``<workdir>/tensorboard/`` (tensorboardX event files: ``tensorboard
--logdir=<workdir>/tensorboard``) and appends one line to ``<workdir>/metrics.jsonl``::

    {"step": 4, "loss/total": 3.2, "loss/trace": 1.1, "learning_rate": 5e-05, ...}

(a resumed run appends to the same file; a step logged twice, before and after an
interruption, keeps both lines, the later one counting); it loads with
``pandas.read_json(path, lines=True)``.

Only process 0 writes; the other processes' writers do nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import tensorboardX
import tqdm
from etils import epath

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Shown on the progress bar; every other scalar goes to the file only.
_BAR_KEYS = (("loss/total", "loss"), ("examples_per_second", "ex/s"))


class MetricsWriter:
    """The progress bar and ``metrics.jsonl`` of one run.

    Args:
      workdir: the run's folder.
      total_steps: the run's last step (the bar's total).
      initial_step: the step the run starts (or resumes) from.
      enabled: write anything at all (True on process 0 only).
    """

    def __init__(self, workdir: epath.PathLike, *, total_steps: int, initial_step: int,
                 enabled: bool):
        self._enabled = enabled
        self._path = epath.Path(workdir) / METRICS_FILE
        self._bar = (tqdm.tqdm(total=total_steps, initial=initial_step, unit="step",
                               dynamic_ncols=True) if enabled else None)
        self._step = initial_step
        self._events = (tensorboardX.SummaryWriter(str(epath.Path(workdir) / TENSORBOARD_DIR))
                        if enabled else None)

    def advance(self, step: int) -> None:
        """Moves the progress bar to ``step``."""
        if self._bar is not None:
            self._bar.update(step - self._step)
        self._step = step

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Appends ``{"step": step, **scalars}`` to ``metrics.jsonl``; the bar shows the loss and
        examples/s among them. Non-finite values are written as JSON ``null``."""
        if not self._enabled:
            return
        record = {"step": step, **{name: (float(value) if math.isfinite(value) else None)
                                   for name, value in scalars.items()}}
        with self._path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if name != "step" and value is not None:
                self._events.add_scalar(name, value, global_step=step)
        self._events.flush()
        shown = {label: f"{scalars[key]:.4g}" for key, label in _BAR_KEYS if key in scalars}
        if shown:
            self._bar.set_postfix(shown, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._events.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_metrics(workdir: epath.PathLike) -> dict[int, dict[str, float | None]]:
    """``{step: scalars}`` from ``metrics.jsonl``; a step written twice (a run interrupted after
    logging it and resumed from an earlier checkpoint) keeps its later values, merged over the
    earlier ones."""
    metrics: dict[int, dict[str, float | None]] = {}
    for line in (epath.Path(workdir) / METRICS_FILE).read_text().splitlines():
        record = json.loads(line)
        metrics.setdefault(record.pop("step"), {}).update(record)
    return metrics
