"""Named compression ratios (spec §7). ``rho`` is the fraction of tokens **removed**."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RatioPreset:
    """A pair of removal ratios.

    Attributes:
        name: the preset's name.
        rho_video: fraction of each video frame's tokens removed.
        rho_audio: fraction of each scored audio chunk's tokens removed.
        description: where the preset comes from.
    """

    name: str
    rho_video: float
    rho_audio: float
    description: str


PRESETS: dict[str, RatioPreset] = {
    "paper-35": RatioPreset("paper-35", 0.67, 0.4, "the paper's 35% retention setting"),
    "paper-25": RatioPreset("paper-25", 0.77, 0.5, "the paper's 25% retention setting"),
    "release-default": RatioPreset("release-default", 0.7, 0.3, "the authors' release default (~33-34% retention)"),
}


def get_preset(name: str) -> RatioPreset:
    """Returns the preset called ``name`` (one of ``PRESETS``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"get_preset: unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None
