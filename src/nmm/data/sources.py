"""Where a run's data comes from: data sources, looked up by the `data.source` config key.

A data source gives the core everything it takes from outside itself:

    modalities        the non-text modalities its documents hold, e.g. ("image",) or ("audio",): the
                      run trains one codec for each (`nmm.train.prepare`)
    texts()           text to train the text tokenizer on (captions, questions, transcripts)
    roles(codecs, data_config)
                      role name -> a sampler drawing one pre-tokenised `Document` of that role
    world, judge      a generative world with exact ground truth and a judge of its items, or None
    image_pool        the pool behind the image roles, or None (vision-encoder pretraining reads it)

and, for each modality, what that modality's codec trainer asks for (the plugin's `train`): images()
for images ((N, H, W, 3) uint8, or None to render `world`'s), waves() for audio (1-D float32 at 16 kHz).

The core ships three sources: "folder" (a user's images with a captions.jsonl, `nmm.data.folder`),
"audio_folder" (a user's recordings with a transcripts.jsonl, `nmm.data.audio_folder`) and "shards"
(WebDataset tar shards, streamed: `nmm.data.shards`; such a source also offers `batches(codecs, cfg,
rank, world_size)`, which the trainer reads instead of packing its roles in memory).
The shapes world and the speech and tone worlds are applications built on the core, so no core
module imports them: `PLUGINS` names the module that defines each, and `data_source` imports it
the first time that source is asked for; the module registers itself, the way Python entry points
find plugins. `data.source=shapes` therefore works from the command line and the library with no
extra import. Sources join with "+": `data.source=shapes+speech` trains on both, with the roles,
texts and modalities of each. Another source is one `register_source(name, factory)` call, where
`factory(run_config)` builds it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from nmm.config import DataConfig, RunConfig
from nmm.data.audio_folder import AudioFolder
from nmm.data.folder import ImageFolderSource
from nmm.data.mixture import (
    ImagePool,
    RoleSampler,
    TranscriptPool,
    build_folder_pool,
    image_roles,
    speech_roles,
)
from nmm.data.shards import ShardSource
from nmm.errors import ConfigError
from nmm.modalities.codecs import Codecs


class DataSource(Protocol):
    """What `nmm.train.prepare` reads a run's data through (see the module docstring)."""

    modalities: tuple[str, ...]
    world: Any | None
    judge: Any | None
    image_pool: ImagePool | None

    def texts(self) -> list[str]: ...

    def roles(self, codecs: Codecs, cfg: DataConfig) -> dict[str, RoleSampler]: ...


SourceFactory = Callable[[RunConfig], DataSource]

SOURCES: dict[str, SourceFactory] = {}
# Sources outside the core, by the module that registers them when imported.
PLUGINS: dict[str, str] = {"shapes": "nmm.data.shapes_source", "speech": "nmm.data.speech_source",
                           "tones": "nmm.data.tones_source", "moving_shapes": "nmm.data.video_source",
                           "video_folder": "nmm.data.video_folder"}


def register_source(name: str, factory: SourceFactory) -> None:
    """Make `data.source=NAME` build its source with `factory(run_config)`. Registering the same
    factory again is a no-op (a module may be imported twice); another factory under a taken name
    is an error."""
    known = SOURCES.get(name)
    if known is not None and known is not factory:
        raise ValueError(f"data source {name!r} is already registered with {known.__qualname__}")
    SOURCES[name] = factory


def data_source(cfg: RunConfig, name: str | None = None) -> DataSource:
    """The data source `name` (default: `cfg.data.source`; "a+b" joins sources) built for the run `cfg`."""
    name = cfg.data.source if name is None else name
    if "+" in name:
        return CompositeSource([data_source(cfg, part.strip()) for part in name.split("+")])
    if name not in SOURCES and name in PLUGINS:
        importlib.import_module(PLUGINS[name])
    if name not in SOURCES:
        known = " | ".join(sorted({*SOURCES, *PLUGINS}))
        raise ConfigError(f"data.source: unknown source '{name}' ({known})")
    return SOURCES[name](cfg)


def world_texts(world, n: int, seed: int) -> list[str]:
    """Captions, questions with their answers, and edit instructions of `n` scenes of `world`."""
    rng = np.random.default_rng(seed)
    texts = []
    for scene in world.scenes(n, seed, "any"):
        texts.append(world.caption(scene))
        q, a, _ = world.question_answer(scene, rng)
        texts.append(f"{q} {a}")
        edit = world.edit(scene, rng)
        if edit is not None:
            texts.append(edit[0])
    return texts


class CompositeSource:
    """Several sources as one (`data.source=shapes+speech`): their modalities, texts and roles
    together. The world and judge are the first part's that has one; `part(modality)` is the source
    that trains a modality's codec."""

    def __init__(self, parts: list):
        self.parts = parts
        self.modalities = tuple(dict.fromkeys(m for p in parts for m in p.modalities))
        self.world = next((p.world for p in parts if p.world is not None), None)
        self.judge = next((p.judge for p in parts if p.judge is not None), None)
        self.image_pool = None

    def part(self, modality: str):
        """The source a modality's codec learns from: the one part that has it, or this composite
        when several do (speech+tones: the audio codec hears both)."""
        having = [p for p in self.parts if modality in p.modalities]
        return having[0] if len(having) == 1 else self

    def waves(self) -> list:
        return [w for p in self.parts if "audio" in p.modalities for w in p.waves()]

    def heldout_waves(self) -> list:
        return [w for p in self.parts if "audio" in p.modalities and hasattr(p, "heldout_waves")
                for w in p.heldout_waves()]

    def texts(self) -> list[str]:
        return [t for p in self.parts for t in p.texts()]

    def roles(self, codecs: Codecs, cfg: DataConfig) -> dict[str, RoleSampler]:
        roles: dict[str, RoleSampler] = {}
        for p in self.parts:
            roles.update(p.roles(codecs, cfg))
        self.image_pool = next((p.image_pool for p in self.parts if p.image_pool is not None), None)
        for p in self.parts:  # roles that need two sources at once (a spoken caption -> its image)
            joint = getattr(p, "joint_roles", None)
            if joint is not None:
                roles.update(joint(self, codecs, cfg))
        return roles


class FolderSource:
    """`data.source=folder`: the images and captions of `data.folder`; no world, so no judge."""

    modalities = ("image",)
    world = None
    judge = None
    image_pool = None

    def __init__(self, cfg: RunConfig):
        if not cfg.data.folder:
            raise ConfigError("data.source=folder needs data.folder=PATH (a folder with captions.jsonl)")
        self.folder = ImageFolderSource(cfg.data.folder, image_size=cfg.image.image_size)
        self.seed = cfg.data.seed

    def texts(self) -> list[str]:
        return self.folder.captions()

    def images(self) -> np.ndarray:
        return np.stack([self.folder[i][0] for i in range(len(self.folder))])

    def roles(self, codecs: Codecs, cfg: DataConfig) -> dict[str, RoleSampler]:
        train, _ = self.folder.split(heldout_fraction=0.1, seed=self.seed)  # the rest is for evaluation
        self.image_pool = build_folder_pool(self.folder, codecs, train)
        return image_roles(self.image_pool, None, cfg.caption_dropout, input_loss=cfg.input_loss)


register_source("folder", FolderSource)


class AudioFolderSource:
    """`data.source=audio_folder`: the recordings and transcripts of `data.audio_folder`
    (`nmm.data.audio_folder`); no world, so no judge. A tenth of the clips (at least one) is held
    out: the codec is measured on them and the language model never sees them."""

    modalities = ("audio",)
    world = None
    judge = None
    image_pool = None

    def __init__(self, cfg: RunConfig):
        if not cfg.data.audio_folder:
            raise ConfigError("data.source=audio_folder needs data.audio_folder=PATH (a folder with transcripts.jsonl)")
        self.folder = AudioFolder(cfg.data.audio_folder, max_seconds=cfg.audio.max_seconds)
        self.train, self.heldout = self.folder.split(heldout_fraction=0.1, seed=cfg.data.seed)
        self.codec_items, self.codec_eval_items = cfg.audio.pool_size, cfg.audio.eval_items
        self.speech_pool: TranscriptPool | None = None

    @property
    def summary(self) -> str:
        """What was loaded, skipped (and why) and converted: `AudioFolder.summary`."""
        return self.folder.summary

    def texts(self) -> list[str]:
        return self.folder.transcripts()

    def waves(self) -> list[np.ndarray]:
        """Training clips for the audio codec: at most audio.pool_size of them."""
        return self.folder.waves(self.train[: self.codec_items])

    def heldout_waves(self) -> list[np.ndarray]:
        return self.folder.waves(self.heldout[: self.codec_eval_items])

    def roles(self, codecs: Codecs, cfg: DataConfig) -> dict[str, RoleSampler]:
        # Every training clip, not audio.pool_size of them: a user's recordings are all the data there is.
        texts = self.folder.transcripts()
        self.speech_pool = TranscriptPool.encode(codecs, [texts[i] for i in self.train], self.folder.waves(self.train))
        return speech_roles(self.speech_pool, cfg.caption_dropout)


register_source("audio_folder", AudioFolderSource)
register_source("shards", ShardSource)  # nmm.data.shards
