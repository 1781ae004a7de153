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

import time

import numpy as np

from nmm.config import DataConfig, RunConfig
from nmm.data.mixture import RoleSampler
from nmm.data.sources import register_source
from nmm.data.tones import PitchJudge, ToneScene, ToneWorld
from nmm.modalities.codecs import Codecs
from nmm.modalities.document import Document, ItemSegment, TextSegment

TOKENIZER_SCENES = 3000  # captions that train the text tokenizer
ENCODE_CHUNK = 256  # scenes rendered and encoded at a time (waveforms are not kept)


def make_tone_world(cfg: RunConfig | None = None) -> ToneWorld:
    """The tone world of a run (the source's and the evaluation's: one definition for both).
    It has no config keys today; `cfg` is where they would be read."""
    return ToneWorld()


class TonePool:
    """Pre-tokenised tone scenes: the scenes, their captions and audio ids (one 1-D array each)."""

    def __init__(self, scenes: list[ToneScene], captions: list[str], codes: list[np.ndarray]):
        self.scenes, self.captions, self.codes = scenes, captions, codes

    def __len__(self) -> int:
        return len(self.scenes)


def build_tone_pool(world: ToneWorld, codecs: Codecs, scenes: list[ToneScene]) -> TonePool:
    codes: list[np.ndarray] = []
    for i in range(0, len(scenes), ENCODE_CHUNK):
        codes += codecs.encode_items("audio", [world.render(s) for s in scenes[i : i + ENCODE_CHUNK]])
    return TonePool(list(scenes), [world.caption(s) for s in scenes], codes)


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
        t0 = time.time()
        scenes = self.world.scenes(self.pool_size, self.seed + 21, "train")
        self.tone_pool = pool = build_tone_pool(self.world, codecs, scenes)
        self.build_seconds = time.time() - t0

        def pick(rng) -> int:
            return int(rng.integers(len(pool)))

        def tone_captioning(rng):
            i = pick(rng)
            return Document([ItemSegment("audio", codes=pool.codes[i], loss=False), TextSegment(pool.captions[i])],
                            "tone_captioning")

        def tone_synthesis(rng):
            i = pick(rng)
            audio = ItemSegment("audio", codes=pool.codes[i])
            if rng.random() < cfg.caption_dropout:
                return Document([audio], "tone_synthesis")  # unconditional melody, for classifier-free guidance
            return Document([TextSegment(pool.captions[i], loss=False), audio], "tone_synthesis")

        return {"tone_captioning": tone_captioning, "tone_synthesis": tone_synthesis}


def tone_source(cfg: RunConfig) -> ToneSource:
    return ToneSource(cfg)


register_source("tones", tone_source)
