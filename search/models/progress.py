"""Progress of long set-up steps: expert fine-tuning, the SmolLM2 conversion, calibration statistics.

`--quiet` silences the per-candidate bars, not these: a set-up step can take most of an hour
(a 135M-parameter expert on a CPU), and a silent terminal for that long reads as a hang. So a
step says what it does on stderr even when quiet, in lines rather than a bar:

    fine-tune expert arith: 40 steps, ETA 1 min 05 s (until 14:03:12)
    fine-tune expert arith: done in 1 min 02 s

The first line comes once the ETA can be measured: after the second unit of work, at the
rate of the units after the first (which also pays for warm-up), or after the only one; a step
without a count says at once what it does, with an estimate when one is known. The second line
comes when the step ends. Without `--quiet`, a step with a count shows a tqdm bar instead, whose own
ETA updates as it goes; a step without a count prints the same two lines.

    with SetupStep("fine-tune expert arith", total=40, quiet=quiet) as step:
        for ...:
            ...
            step.update(loss=f"{loss:.3f}")
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from tqdm.auto import tqdm


def format_duration(seconds: float) -> str:
    """`8 s`, `3 min 05 s`, `1 h 02 min`: a duration as a person reads it."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class SetupStep:
    """One long set-up step; see the module docstring. Lines go to `stream` (stderr)."""

    def __init__(
        self, label: str, total: int | None = None, *, quiet: bool = False, unit: str = "step",
        estimate_s: float | None = None, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
    ):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.start = clock()
        self.done = 0
        self.first_done: float | None = None  # when the first unit of work ended
        self.announced = False
        self.bar = None
        if total is not None and not quiet:
            self.bar = tqdm(total=total, desc=label, leave=False, file=self.stream)
        elif total is None:
            about = f" (about {format_duration(estimate_s)})" if estimate_s else ""
            self.say(f"{label}{about} ...")
            self.announced = True

    def say(self, line: str) -> None:
        tqdm.write(line, file=self.stream)  # between bars, never through one

    def eta_s(self, now: float) -> float:
        """Seconds left at the rate of the units after the first (all of them when only one)."""
        left = max(0, self.total - self.done)
        if self.done > 1 and self.first_done is not None:
            return (now - self.first_done) / (self.done - 1) * left
        return (now - self.start) / max(1, self.done) * left

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix)
            return
        if self.announced or not self.total:
            return
        now = self.clock()
        if self.first_done is None:
            self.first_done = now
            if self.done < min(2, self.total):
                return  # the first unit also pays for warm-up: measure the rate on the next
        eta = self.eta_s(now)
        until = time.strftime("%H:%M:%S", time.localtime(time.time() + eta))
        self.say(f"{self.label}: {self.total} {self.unit}s, ETA {format_duration(eta)} (until {until})")
        self.announced = True

    def close(self, failed: bool = False) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            return
        if self.announced:
            outcome = "failed after" if failed else "done in"
            self.say(f"{self.label}: {outcome} {format_duration(self.clock() - self.start)}")
            self.announced = False  # closed: a second close says nothing

    def __enter__(self) -> "SetupStep":
        return self

    def __exit__(self, exc_type, *exc) -> bool:
        self.close(failed=exc_type is not None)
        return False


__all__ = ["SetupStep", "format_duration"]
