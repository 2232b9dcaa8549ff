"""The colours every picture shares: green means "correct" everywhere, blue / orange are SSN's word selection."""
from __future__ import annotations

__all__ = [
    "GT_COLOUR",
    "GT_COLOUR_HEX",
    "FAILURE_COLOUR",
    "NEUTRAL_COLOUR",
    "TILE_BORDER",
    "REFERENCE_BORDER",
    "UPGRADE_COLOUR",
    "DEGRADE_COLOUR",
    "TEXT_COLOUR",
    "MUTED_TEXT",
    "word_colour",
]

# Green means "correct" everywhere: the ground-truth frame, the SUCCESS marker, the best epoch.
GT_COLOUR = (0, 170, 0)
GT_COLOUR_HEX = "#{:02x}{:02x}{:02x}".format(*GT_COLOUR)
FAILURE_COLOUR = (205, 30, 30)
NEUTRAL_COLOUR = (110, 110, 110)
TILE_BORDER = (200, 200, 200)
REFERENCE_BORDER = (60, 60, 60)
UPGRADE_COLOUR = (25, 85, 215)  # s_t -> 1: the word is kept (upgradation)
DEGRADE_COLOUR = (225, 110, 0)  # s_t -> 0: the word is shifted away (degradation)
TEXT_COLOUR = (20, 20, 20)
MUTED_TEXT = (110, 110, 110)


def word_colour(weight: float) -> tuple[int, int, int]:
    """Blue for upgradation, orange for degradation, fading to grey as s_t approaches 0.5."""
    strength = min(1.0, abs(weight - 0.5) * 2) ** 0.5
    base = UPGRADE_COLOUR if weight >= 0.5 else DEGRADE_COLOUR
    return tuple(int(round(c * strength + m * (1 - strength))) for c, m in zip(base, MUTED_TEXT))  # type: ignore[return-value]
