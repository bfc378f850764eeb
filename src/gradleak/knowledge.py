"""What the server knows about the private batch besides the update: the threat model of a run.

An honest-but-curious server in FedSGD knows the batch size (the protocol fixes it) and nothing else
of the batch. `--knows` names what it knows on every command that runs an attack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gradleak.errors import GradleakError

# what --knows names -> the spec field that holds it
KNOWS_FIELDS: dict[str, str] = {
    "batch-size": "known_batch_size",
    "lengths": "known_lengths",
    "labels": "known_labels",
}
DEFAULT_KNOWS = "batch-size"


@dataclass(frozen=True)
class Knows:
    """Which facts of the batch the server is given (the spec-level view; the attack's `Knowledge`
    holds the values themselves)."""

    batch_size: bool = True
    lengths: bool = False
    labels: bool = False

    def spec_fields(self) -> dict[str, bool]:
        return {
            "known_batch_size": self.batch_size,
            "known_lengths": self.lengths,
            "known_labels": self.labels,
        }

    def to_json(self) -> dict[str, bool]:
        return {"batch_size": self.batch_size, "lengths": self.lengths, "labels": self.labels}

    def describe(self) -> str:
        flags = (self.batch_size, self.lengths, self.labels)
        names = [name for name, on in zip(KNOWS_FIELDS, flags, strict=True) if on]
        return ",".join(names) or "none"


def parse_knows(text: str) -> Knows:
    """`"batch-size,lengths,labels"` (any subset, any order) or `"none"` -> Knows."""
    items = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not items:
        raise GradleakError("--knows is empty; name a subset of batch-size,lengths,labels, or none")
    if items == ["none"]:
        return Knows(batch_size=False, lengths=False, labels=False)
    unknown = [item for item in items if item not in KNOWS_FIELDS]
    if unknown:
        raise GradleakError(
            f"--knows: unknown item {unknown[0]!r}; name a subset of {','.join(KNOWS_FIELDS)}, or none"
        )
    return Knows(batch_size="batch-size" in items, lengths="lengths" in items, labels="labels" in items)


def knows_of(spec: Any) -> Knows:
    """The Knows of any spec with the known_* fields (RunSpec, the Flower spec)."""
    return Knows(
        batch_size=bool(spec.known_batch_size),
        lengths=bool(spec.known_lengths),
        labels=bool(spec.known_labels),
    )
