"""Attacks registered by name: gradient matching (dlg, tag, cos) and exact recovery (exact)."""

from gradleak.attacks import matching  # noqa: F401  (registers dlg, tag, cos)
from gradleak.attacks.base import (
    ATTACKS,
    Attack,
    AttackOptions,
    Knowledge,
    Reconstruction,
    get_attack,
)

__all__ = ["ATTACKS", "Attack", "AttackOptions", "Knowledge", "Reconstruction", "get_attack"]
