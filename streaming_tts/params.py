"""What a request may choose of a voice's synthesis (no torch here: the front ends of a server
split over processes use it, and they never load the model)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SynthesisParams:
    """Per-request settings; the voice's config supplies the defaults."""

    speaker: int = 0
    noise_scale: float = 0.667
    length_scale: float = 1.0                    # 1 / speed
    noise_w: float = 0.8
