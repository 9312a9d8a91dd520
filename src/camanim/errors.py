"""The one exception type camanim raises for bad input."""

from __future__ import annotations


class CAManimError(ValueError):
    """Bad input to camanim: the message names the problem and the fix."""
