"""Sweeps: a grid of runs (TOML) executed in-process or on Ray, each written to the results store as it
finishes, so that an interrupted sweep resumes where it stopped."""

from gradleak.sweeps.grid import SweepPlan, load_plan, parse_plan
from gradleak.sweeps.jobs import KINDS, Job, execute
from gradleak.sweeps.runner import SweepSummary, run_sweep

__all__ = [
    "KINDS",
    "Job",
    "SweepPlan",
    "SweepSummary",
    "execute",
    "load_plan",
    "parse_plan",
    "run_sweep",
]
