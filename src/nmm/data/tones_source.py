"""`data.source=tones`: the procedural tone world (nmm.data.tones) as a data source of the core:
short melodies (1-4 notes, one timbre, one tempo) with exact ground truth, the audio twin of shapes.
Joined with speech (`data.source=speech+tones`) one model learns both.

The core does not import this module: `nmm.data.sources.PLUGINS` names it, and the registry
imports it the first time the source is asked for.

Roles (`data.roles`):
  tone_captioning  <audio> caption   loss on the caption  (melody -> "slow square : c4 short e4 long", M2T)
  tone_synthesis   caption <audio>   loss on the audio    (caption -> melody, M2G; caption dropped at
                                                           data.caption_dropout for classifier-free guidance)

Everything the run trains on (the text tokenizer's captions, the codec's waves, the language model's
pool) comes from the world's "train" split, so the held-out (timbre, pitch) combinations
(`ToneWorld.heldout`) are never heard or read in training; the evaluation's "heldout_combo" split
asks for them. The codec's own held-out measurement uses that split too.

The pool is `data.speech_pool_size` scenes (the audio pool size of the run; there is no separate
key for tones): tone renders are cheap, so the cost is the codec's encoding, as for speech.
"""

from __future__ import annotations

import numpy as np

from nmm.config import DataConfig, RunConfig
from nmm.data.mixture import RoleSampler, TranscriptPool, speech_roles
from nmm.data.sources import register_source
from nmm.data.tones import PitchJudge, ToneScene, ToneWorld
from nmm.modalities.codecs import Codecs

TOKENIZER_SCENES = 3000  # captions that train the text tokenizer


def make_tone_world(cfg: RunConfig | None = None) -> ToneWorld:
    """The tone world of a run (the source's and the evaluation's: one definition for both).
    It has no config keys today; `cfg` is where they would be read."""
    return ToneWorld()


class TonePool(TranscriptPool):
    """Pre-tokenised tone scenes: their captions (`texts`) and audio ids, and the scenes themselves."""

    def __init__(self, scenes: list[ToneScene], captions: list[str], codes: list[np.ndarray]):
        super().__init__(captions, codes)
        self.scenes = scenes


def build_tone_pool(world: ToneWorld, codecs: Codecs, scenes: list[ToneScene]) -> TonePool:
    pool, kept = TranscriptPool.rendered(codecs, [world.caption(s) for s in scenes], lambda i: world.render(scenes[i]))
    return TonePool([scenes[i] for i in kept], pool.texts, pool.codes)


class ToneSource:
    """Melodies and their captions; held-out (timbre, pitch) combinations never appear in training."""

    modalities = ("audio",)
    image_pool = None

    def __init__(self, cfg: RunConfig):
        self.world = make_tone_world(cfg)
        self.judge = PitchJudge()
        self.seed, self.pool_size = cfg.data.seed, cfg.data.speech_pool_size
        self.codec_items, self.codec_eval_items = cfg.audio.pool_size, cfg.audio.eval_items
        self.tone_pool: TonePool | None = None

    def texts(self) -> list[str]:
        scenes = self.world.scenes(TOKENIZER_SCENES, self.seed + 20, "train")
        return [self.world.caption(s) for s in scenes] + self.world.all_words()

    def waves(self) -> list[np.ndarray]:
        """Train-split renders the audio codec learns from (`audio.pool_size`)."""
        return [self.world.render(s) for s in self.world.scenes(self.codec_items, self.seed + 22, "train")]

    def heldout_waves(self) -> list[np.ndarray]:
        """Renders of held-out combinations (`audio.eval_items`): the codec's training stats."""
        return [self.world.render(s) for s in self.world.scenes(self.codec_eval_items, self.seed + 23, "heldout_combo")]

    def roles(self, codecs: Codecs, cfg: DataConfig) -> dict[str, RoleSampler]:
        scenes = self.world.scenes(self.pool_size, self.seed + 21, "train")
        self.tone_pool = pool = build_tone_pool(self.world, codecs, scenes)  # texts = the captions
        return speech_roles(pool, cfg.caption_dropout, names=("tone_captioning", "tone_synthesis"))


def tone_source(cfg: RunConfig) -> ToneSource:
    return ToneSource(cfg)


register_source("tones", tone_source)
