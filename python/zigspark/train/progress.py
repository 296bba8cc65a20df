"""One-line progress reports for long loops: step, loss, throughput and the time left.

    step 1200/5000  loss 0.1832  412.7 img/s  0.310 s/step  ETA 19m38s

Throughput and step time are measured over the window since the previous line, so they track the current
speed; the ETA extrapolates that window's step time to the remaining steps.
"""

from __future__ import annotations

import time
from typing import Callable, Optional


def format_duration(seconds: float) -> str:
    """'42s', '3m05s', '1h02m'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLine:
    """Formats and prints (through `printer`; None → silent) a line per `report` call.

    Args:
        total: the last step of the loop.
        images_per_step: images one step processes (the global batch), for the throughput.
        start_step: the step the loop starts from (non-zero when resuming).
    """

    def __init__(self, total: int, images_per_step: int, printer: Optional[Callable[[str], None]] = print,
                 start_step: int = 0, clock: Callable[[], float] = time.perf_counter):
        self.total, self.images_per_step, self.printer, self.clock = total, images_per_step, printer, clock
        self._t0, self._step0 = clock(), start_step

    def report(self, step: int, loss: float) -> str:
        """Print the line for `step` (steps done so far) with the window's mean `loss`; returns it."""
        now = self.clock()
        steps = max(step - self._step0, 1)
        per_step = max(now - self._t0, 1e-9) / steps
        line = (f"step {step}/{self.total}  loss {loss:.4f}  {self.images_per_step / per_step:.1f} img/s  "
                f"{per_step:.3f} s/step  ETA {format_duration(per_step * (self.total - step))}")
        if self.printer is not None:
            self.printer(line)
        self._t0, self._step0 = now, step
        return line
