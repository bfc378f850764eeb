"""Attacks registered by name: gradient matching (dlg, tag, cos, lamp) and exact recovery (exact)."""

from gradleak.attacks import exact, lamp, matching  # noqa: F401  (register the attacks)
from gradleak.attacks.base import (
    ATTACKS,
    Attack,
    AttackOptions,
    Knowledge,
    Reconstruction,
    get_attack,
)

__all__ = ["ATTACKS", "Attack", "AttackOptions", "Knowledge", "Reconstruction", "get_attack"]
