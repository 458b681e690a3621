"""Named models, pyiqa-style: one table of pure data from a name to a model folder."""

from __future__ import annotations

from pathlib import Path

_PRESET_ROOT = Path(__file__).resolve().parent.parent / "presets"

#: name -> (folder inside the package, one-line description)
PRESETS: dict[str, tuple[str, str]] = {
    "biq2021-mobilenetv2": (
        "biq2021_mobilenetv2",
        "Technical quality of photos: MobileNetV2 (ImageNet) multi-layer features + MLP head, "
        "trained on BIQ2021; runs offline.",
    ),
}
DEFAULT_PRESET = "biq2021-mobilenetv2"


def list_models() -> dict[str, str]:
    """Preset names and what they are."""
    return {name: desc for name, (_, desc) in PRESETS.items()}


class UnknownPresetError(KeyError):
    """A preset name that is not in :data:`PRESETS` (a KeyError whose message prints without quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def preset_folder(name: str) -> Path:
    key = DEFAULT_PRESET if name == "default" else name
    if key not in PRESETS:
        raise UnknownPresetError(f"unknown model preset {name!r}; known: {', '.join(['default', *PRESETS])}")
    return _PRESET_ROOT / PRESETS[key][0]
