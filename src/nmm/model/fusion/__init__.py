"""Modality variants, one module each. The image modality's variant is picked by
`ModelConfig.variant` from `VARIANTS`, audio's by `ModelConfig.audio_variant` from `AUDIO_VARIANTS`;
every other modality uses discrete early fusion.

Adding a variant = a module with a `ModalityInterface` subclass, a line here and a preset.
"""

from __future__ import annotations

from nmm.config import ModelConfig
from nmm.modalities.vocab import Vocabulary
from nmm.model.fusion.audio import ContinuousAudio, LateFusionAudio, MidFusionAudio
from nmm.model.fusion.base import LossTerm, ModalityInterface
from nmm.model.fusion.continuous import ContinuousImages
from nmm.model.fusion.decoupled import DecoupledImages
from nmm.model.fusion.discrete import DiscreteCodes
from nmm.model.fusion.janus import JanusImages
from nmm.model.fusion.late import LateFusionImages
from nmm.model.fusion.mid import MidFusionImages

VARIANTS: dict[str, type[ModalityInterface]] = {
    "early-discrete": DiscreteCodes,  # Chameleon, Emu3
    "early-continuous": ContinuousImages,  # Transfusion
    "early-decoupled": DecoupledImages,  # Janus-like: nmm's own encoder over codes in, codes out
    "early-janus": JanusImages,  # Janus itself (imported): SigLIP over pixels in, VQ codes out
    "late": LateFusionImages,  # LLaVA
    "mid": MidFusionImages,  # Flamingo
}


AUDIO_VARIANTS: dict[str, type[ModalityInterface]] = {
    "early-discrete": DiscreteCodes,  # the codec's codes as tokens, in and out (speech synthesis too)
    "early-continuous": ContinuousAudio,  # codec latents projected into the backbone (Fuyu-style, for audio)
    "late": LateFusionAudio,  # audio encoder + projector (Qwen-Audio)
    "mid": MidFusionAudio,  # audio features as cross-attention memory (Flamingo)
}
MODALITY_VARIANTS = {"image": VARIANTS, "audio": AUDIO_VARIANTS}


def build_interfaces(cfg: ModelConfig, vocab: Vocabulary) -> dict[str, ModalityInterface]:
    """One interface per modality of the vocabulary, in vocabulary order."""
    out = {}
    for spec in vocab.modalities:
        variants = MODALITY_VARIANTS.get(spec.name, {"early-discrete": DiscreteCodes})
        cls = variants[cfg.variant_of(spec.name)]
        out[spec.name] = cls(cfg, vocab, spec.name)
    if sum(i.fusion == "mid" for i in out.values()) > 1:
        raise ValueError("only one modality can use mid fusion (one cross-attention memory)")
    return out


__all__ = ["AUDIO_VARIANTS", "MODALITY_VARIANTS", "VARIANTS", "LossTerm", "ModalityInterface", "build_interfaces"]
