"""References beside reconstructions, matched tokens marked, every piece HTML-escaped.

Reconstructed text is attacker-controlled: it is escaped word by word before any markup is added,
so a reconstruction of `<script>...` shows as that text and never runs.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

_WORD = re.compile(r"\S+")


def _norm(word: str) -> str:
    return re.sub(r"[^\w]", "", word.lower()) or word.lower()


def mark_common(text: str, other: str) -> str:
    """`text` escaped, its words that also occur in `other` (as a multiset, case and punctuation
    ignored) wrapped in <mark>."""
    available = Counter(_norm(w) for w in _WORD.findall(other))
    out: list[str] = []
    last = 0
    for m in _WORD.finditer(text):
        out.append(html.escape(text[last : m.start()]))
        word, key = m.group(), _norm(m.group())
        if available[key] > 0:
            available[key] -= 1
            out.append(f"<mark>{html.escape(word)}</mark>")
        else:
            out.append(html.escape(word))
        last = m.end()
    out.append(html.escape(text[last:]))
    return "".join(out)


@dataclass(frozen=True)
class Pair:
    reference: str  # HTML, escaped and marked
    reconstruction: str  # HTML, escaped and marked


def pairs(references: Sequence[str], reconstructions: Sequence[str]) -> list[Pair]:
    """Each reference with the reconstruction the Hungarian assignment on ROUGE-1 gives it (as the
    scores do), matched words marked on both sides."""
    from gradleak.metrics import match

    assignment = match(references, reconstructions) if reconstructions else [-1] * len(references)
    out = []
    for i, ref in enumerate(references):
        j = assignment[i]
        rec = reconstructions[j] if 0 <= j < len(reconstructions) else ""
        out.append(Pair(mark_common(ref, rec), mark_common(rec, ref)))
    return out
