"""gradleak inside Flower: what a Flower server could read from its own clients' updates.

- `LeakageAudit(strategy, victim=..., attack=..., store=...)` (`audit.py`): a strategy wrapper that
  attacks every client's update as the server receives it and records the leak per round and client;
  the wrapped strategy aggregates unchanged.
- `make_client_app(spec)` (`client.py`): a Flower ClientApp that trains a gradleak victim on its shard of
  a real data set, with Flower's DP mods (`LocalDpMod`, `fixedclipping_mod`) or gradleak defences.
- `run_fl(spec, store=...)` (`simulation.py`): both in Flower's Simulation Runtime; `gradleak fl`.

Everything loads when first used: `FlSpec` and the data partitions (`spec.py`) need no Flower; the rest
imports `flwr` (the `fl` extra).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "FlSpec": "gradleak.flower.spec",
    "partitions": "gradleak.flower.spec",
    "LeakageAudit": "gradleak.flower.audit",
    "ClientLeak": "gradleak.flower.audit",
    "make_client_app": "gradleak.flower.client",
    "run_fl": "gradleak.flower.simulation",
    "FlResult": "gradleak.flower.simulation",
}

__all__ = ["ClientLeak", "FlResult", "FlSpec", "LeakageAudit", "make_client_app", "partitions", "run_fl"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
