"""Other load on the machine: CPU time that neither this run nor its children used.

The machine is shared (test suites run beside the benchmark), and a burst of foreign CPU
on either core shows up as latency on whichever path was being measured. Each measured
round waits, within a bound, until the machine is quiet, and reports the foreign CPU
seconds spent while it ran, so a contaminated round can be repeated and counted.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from procs import CLK_TCK, cpu_of

QUIET_SHARE = 0.1  # of one core: what "quiet" means before a round
WINDOW = 0.3  # seconds of observation per check
NOISY_SHARE = 0.25  # of one core during a round: repeat the round


def busy_seconds() -> float:
    """user+nice+system of all cores (irq/softirq left out: loopback traffic of our own
    processes is charged there, not to them)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(fields[1]) + int(fields[2]) + int(fields[3])) / CLK_TCK


@dataclass(frozen=True, slots=True)
class Mark:
    at: float
    busy: float
    ours: float


class Machine:
    """Foreign CPU = machine busy time - the CPU time of our own process trees."""

    def __init__(self, our_pids: Callable[[], list[int]], budget: float) -> None:
        self._our_pids = our_pids
        self.budget = budget  # seconds of waiting for quiet over the whole run
        self.waited = 0.0

    def mark(self) -> Mark:
        pids = [os.getpid(), *self._our_pids()]
        return Mark(time.monotonic(), busy_seconds(), cpu_of(pids).total)

    def foreign(self, since: Mark) -> tuple[float, float]:
        """(foreign CPU-seconds, wall seconds) since a mark."""
        now = self.mark()
        return max(0.0, (now.busy - since.busy) - (now.ours - since.ours)), now.at - since.at

    async def wait_quiet(self, max_wait: float) -> float:
        """Wait until a window passes with foreign CPU under QUIET_SHARE of a core, at most
        max_wait seconds and within the run's budget; return the seconds waited."""
        start = time.monotonic()
        while self.waited < self.budget:
            mark = self.mark()
            await asyncio.sleep(WINDOW)
            cpu, wall = self.foreign(mark)
            self.waited += wall
            if cpu <= QUIET_SHARE * wall or time.monotonic() - start >= max_wait:
                break
        return time.monotonic() - start
