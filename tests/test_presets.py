"""Named ratio presets (spec §7)."""

from __future__ import annotations

import dataclasses

import pytest

from omnisift_kernels import PRESETS, RatioPreset, get_preset
from omnisift_kernels._validation import check_ratio


@pytest.mark.parametrize(
    "name, rho_audio, rho_video",
    [("paper-35", 0.4, 0.67), ("paper-25", 0.5, 0.77), ("release-default", 0.3, 0.7)],
)
def test_preset_values(name, rho_audio, rho_video):
    p = get_preset(name)
    assert isinstance(p, RatioPreset)
    assert p.name == name
    assert (p.rho_audio, p.rho_video) == (rho_audio, rho_video)
    assert p is PRESETS[name]
    assert p.description
    # Every preset passes validation.
    assert check_ratio("t", "rho_audio", p.rho_audio) == rho_audio
    assert check_ratio("t", "rho_video", p.rho_video) == rho_video


def test_preset_set():
    assert set(PRESETS) == {"paper-35", "paper-25", "release-default"}


def test_presets_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_preset("paper-35").rho_audio = 0.1


@pytest.mark.parametrize("bad", ["paper-30", "", "PAPER-35", None])
def test_get_preset_unknown(bad):
    with pytest.raises(ValueError, match="unknown preset") as e:
        get_preset(bad)
    assert "paper-35" in str(e.value)  # lists the valid names
