"""How torch's OpenMP worker threads wait, chosen before torch is imported.

GNU OpenMP (torch's CPU thread pool) lets an idle worker spin on its core for a
while before it sleeps. On a machine of its own that saves a wake-up per
parallel region; beside one other busy process on a small machine it takes the
core the other process needs and leaves our own threads waiting for each other,
and a step runs several times slower (docs/benchmarks.md, noisy_neighbour). So
the ``smalti`` command makes the workers sleep at once (``OMP_WAIT_POLICY=PASSIVE``)
unless the user chose a policy: ``OMP_WAIT_POLICY=ACTIVE`` (or any
``GOMP_SPINCOUNT``) in the environment is left as it is.

libgomp reads the variable once, when torch loads it, so this runs first thing
in the command line, before anything imports torch. A Python program that
imports torch itself sets the variable itself (or calls this before its first
``import torch``).
"""

from __future__ import annotations

import os
import sys

WAIT_POLICY = "OMP_WAIT_POLICY"
SPIN_COUNT = "GOMP_SPINCOUNT"
DEFAULT_WAIT_POLICY = "PASSIVE"


def apply_thread_defaults() -> str:
    """Set Smalti's wait policy unless the user set one; return the policy in force (for the record)."""
    if WAIT_POLICY in os.environ or SPIN_COUNT in os.environ:
        return os.environ.get(WAIT_POLICY) or f"{SPIN_COUNT}={os.environ[SPIN_COUNT]}"
    if "torch" in sys.modules:  # too late for libgomp to read it: say nothing, change nothing
        return "torch default (torch was imported first)"
    os.environ[WAIT_POLICY] = DEFAULT_WAIT_POLICY
    return DEFAULT_WAIT_POLICY
