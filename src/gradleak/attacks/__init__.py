"""Attacks registered by name: gradient matching (dlg, tag, cos, lamp, lamp-l1l2, lamp-span), exact recovery
(exact) and its noise-robust variant (exact-robust)."""

from gradleak.attacks import exact, lamp, matching, robust  # noqa: F401  (register the attacks)
from gradleak.attacks.base import (
    ATTACKS,
    Attack,
    AttackOptions,
    Knowledge,
    Reconstruction,
    get_attack,
)

__all__ = ["ATTACKS", "Attack", "AttackOptions", "Knowledge", "Reconstruction", "get_attack"]
