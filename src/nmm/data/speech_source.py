"""`data.source=speech`: speech synthesised with eSpeak NG (nmm.data.speech) as a data source of
the core; joined with shapes (`data.source=shapes+speech`) it adds spoken captions -> images.

The core does not import this module: `nmm.data.sources.PLUGINS` names it, and the registry
imports it the first time the source is asked for.

Roles (`data.roles`):
  transcription      <audio> transcript          loss on the text    (speech recognition, M2T)
  synthesis          text <audio>                loss on the audio   (speech synthesis, M2G; text dropped
                                                                      at data.caption_dropout for CFG)
  spoken_generation  <audio of a caption> <image>  loss on the image (with shapes: M2M)
  spoken_qa          <image> <audio of a question> answer   loss on the answer (with shapes)
"""

from __future__ import annotations

import numpy as np

from nmm.config import DataConfig, RunConfig
from nmm.data.mixture import RoleSampler, TranscriptPool, speech_roles
from nmm.data.sources import register_source
from nmm.data.speech import SpeechWorld
from nmm.modalities.codecs import Codecs
from nmm.modalities.document import Document, ItemSegment, TextSegment

TOKENIZER_UTTERANCES = 3000  # utterance texts that train the text tokenizer


def build_speech_pool(world: SpeechWorld, codecs: Codecs, utterances: list[tuple[str, object]]) -> tuple[TranscriptPool, list[int]]:
    """Utterances (text, voice) rendered and encoded; too-long ones left out (`TranscriptPool.rendered`)."""
    return TranscriptPool.rendered(codecs, [t for t, _ in utterances], lambda i: world.render(*utterances[i]))


class SpeechSource:
    """Utterances of digits, numbers, words and sentences in many voices; held-out voices never
    appear in training (`SpeechWorld.utterances(split="heldout")` is for evaluation)."""

    modalities = ("audio",)
    judge = None  # the recogniser that judges speech is trained by the evaluation (nmm.eval.speech_judge)
    image_pool = None

    def __init__(self, cfg: RunConfig, sentences: list[str] | None = None):
        self.world = SpeechWorld(sentences=sentences)
        self.seed, self.pool_size = cfg.data.seed, cfg.data.speech_pool_size
        self.codec_items, self.codec_eval_items = cfg.audio.pool_size, cfg.audio.eval_items
        self.speech_pool: TranscriptPool | None = None

    def texts(self) -> list[str]:
        return [t for t, _ in self.world.utterances(TOKENIZER_UTTERANCES, self.seed, "train")]

    def waves(self) -> list[np.ndarray]:
        return [self.world.render(t, v) for t, v in self.world.utterances(self.codec_items, self.seed + 2, "train")]

    def heldout_waves(self) -> list[np.ndarray]:
        pairs = self.world.utterances(self.codec_eval_items, self.seed + 3, "heldout")
        return [self.world.render(t, v) for t, v in pairs]

    def roles(self, codecs: Codecs, cfg: DataConfig) -> dict[str, RoleSampler]:
        self.speech_pool, _ = build_speech_pool(self.world, codecs,
                                                self.world.utterances(self.pool_size, self.seed + 1, "train"))
        return speech_roles(self.speech_pool, cfg.caption_dropout)

    def joint_roles(self, joined, codecs: Codecs, cfg: DataConfig) -> dict[str, RoleSampler]:
        """With an image source beside it: a spoken caption -> that caption's image (M2M), and, when
        the images have a world that asks questions, an image + a spoken question -> the answer."""
        images = joined.image_pool
        if images is None:
            return {}
        n = min(len(images), max(1, self.pool_size // 2))
        rng = np.random.default_rng([self.seed, 11])
        index = rng.choice(len(images), size=n, replace=False)
        voices = self.world.voices("train")
        spoken, kept = build_speech_pool(self.world, codecs, [(images.captions[i], voices[rng.integers(len(voices))])
                                                              for i in index])
        spoken_index = index[kept]

        def spoken_generation(rng):
            j = int(rng.integers(len(spoken)))
            return Document([ItemSegment("audio", codes=spoken.codes[j], loss=False),
                             ItemSegment("image", codes=images.codes[spoken_index[j]])], "spoken_generation")

        roles = {"spoken_generation": spoken_generation}
        if joined.world is not None and images.scenes is not None:
            qa = [(int(i), *joined.world.question_answer(images.scenes[i], rng)[:2]) for i in index]
            questions, kept = build_speech_pool(self.world, codecs, [(q, voices[rng.integers(len(voices))])
                                                                     for _, q, _ in qa])
            qa = [qa[j] for j in kept]

            def spoken_qa(rng):
                j = int(rng.integers(len(qa)))
                i, _, answer = qa[j]
                return Document([ItemSegment("image", codes=images.codes[i], loss=False),
                                 ItemSegment("audio", codes=questions.codes[j], loss=False), TextSegment(answer)],
                                "spoken_qa")

            roles["spoken_qa"] = spoken_qa
        return roles


def speech_source(cfg: RunConfig) -> SpeechSource:
    return SpeechSource(cfg)


register_source("speech", speech_source)
