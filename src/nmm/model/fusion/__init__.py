"""Image variants, one module each; `ModelConfig.variant` picks one from `VARIANTS`.

Adding a variant = a module with an `ImageInterface` subclass, a line here and a preset.
"""

from __future__ import annotations

from nmm.model.fusion.base import ImageInterface, LossTerm
from nmm.model.fusion.continuous import ContinuousImages
from nmm.model.fusion.decoupled import DecoupledImages
from nmm.model.fusion.discrete import DiscreteImages
from nmm.model.fusion.late import LateFusionImages
from nmm.model.fusion.mid import MidFusionImages

VARIANTS: dict[str, type[ImageInterface]] = {
    "early-discrete": DiscreteImages,  # Chameleon, Emu3
    "early-continuous": ContinuousImages,  # Transfusion
    "early-decoupled": DecoupledImages,  # Janus
    "late": LateFusionImages,  # LLaVA
    "mid": MidFusionImages,  # Flamingo
}

__all__ = ["VARIANTS", "ImageInterface", "LossTerm"]
