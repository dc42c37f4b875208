"""How torch's OpenMP worker threads wait, chosen before torch is imported.

GNU OpenMP (torch's CPU thread pool) lets an idle worker spin on its core for a
while before it sleeps. On a machine of its own that saves a wake-up per
parallel region (a step of the demo model is 1.3-1.5x slower without it). Beside
another busy process on a small machine it is ruinous: the spinning worker takes
the core the other process needs, our own threads then wait for each other, and a
step runs about 4x slower (docs/benchmarks.md, noisy_neighbour).

So a command that trains looks at the machine first: if other processes keep at
least half a core busy over a quarter of a second, idle workers sleep at once
(``OMP_WAIT_POLICY=PASSIVE``, one line on stderr says so); otherwise torch's own
default stands. A policy the user chose (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``
in the environment) is never touched. The wait policy changes only waiting, never
a number, so exact resume and replay do not depend on it.

libgomp reads the variable once, when torch loads it, so this runs in the command
line before anything imports torch; a busy neighbour that starts later is not seen
(set the variable yourself where that happens). A Python program that imports torch
itself sets the variable itself, or calls this before its first ``import torch``.
"""

from __future__ import annotations

import os
import sys
import time

WAIT_POLICY = "OMP_WAIT_POLICY"
SPIN_COUNT = "GOMP_SPINCOUNT"
PASSIVE = "PASSIVE"
BUSY_THRESHOLD = 0.5  # cores kept busy by other processes, from which spinning costs more than it saves


def other_processes_busy_cores(seconds: float = 0.25) -> float | None:
    """Cores kept busy over ``seconds`` by everything but this (idle) process; None where /proc/stat is not."""

    def sample() -> tuple[float, float]:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [float(x) for x in handle.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])

    try:
        busy_before, total_before = sample()
        own_before = sum(os.times()[:2])
        time.sleep(seconds)
        busy_after, total_after = sample()
        own_after = sum(os.times()[:2])
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total_after - total_before
    if elapsed <= 0:
        return None
    cores = os.cpu_count() or 1
    busy = (busy_after - busy_before) / elapsed * cores  # in cores, all processes
    own = (own_after - own_before) / seconds
    return max(0.0, busy - own)


def choose_wait_policy(environment: dict[str, str], busy_cores: float | None) -> str | None:
    """The policy to set (None: leave the environment as it is)."""
    if WAIT_POLICY in environment or SPIN_COUNT in environment:
        return None
    if busy_cores is None or busy_cores < BUSY_THRESHOLD:
        return None
    return PASSIVE


def apply_thread_defaults(busy_cores: float | None = None, announce: bool = True) -> str:
    """Set the wait policy for a training command; return what is in force, for the record."""
    chosen = os.environ.get(WAIT_POLICY) or (
        f"{SPIN_COUNT}={os.environ[SPIN_COUNT]}" if SPIN_COUNT in os.environ else None
    )
    if chosen is not None:
        return f"{chosen} (set by the user)"
    if "torch" in sys.modules:  # too late for libgomp to read it: say nothing, change nothing
        return "torch default (torch was imported first)"
    if busy_cores is None:
        busy_cores = other_processes_busy_cores()
    policy = choose_wait_policy(dict(os.environ), busy_cores)
    if policy is None:
        return "torch default (the machine is otherwise idle)"
    os.environ[WAIT_POLICY] = policy
    if announce:
        print(
            f"smalti: other processes keep {busy_cores:.1f} of {os.cpu_count()} CPU cores busy: idle torch threads "
            f"will sleep at once ({WAIT_POLICY}={policy}; set {WAIT_POLICY} yourself to choose)",
            file=sys.stderr,
        )
    return policy
