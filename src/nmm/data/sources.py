"""Where a run's data comes from: data sources, looked up by the `data.source` config key.

A data source gives the core everything it takes from outside itself:

    texts()        text to train the text tokenizer on (captions, questions, edit instructions)
    images()       (N, H, W, 3) uint8 images to train the image tokenizer on; None: render `world`'s
    pool(codecs)   the language model's pre-tokenised images and captions (an `ImagePool`)
    world          a generative world (scenes, render, caption, question_answer, edit, cell_labels),
                   or None; the QA role and vision-encoder pretraining need one
    judge          scores images of `world` against their scenes (`judge.score(image, scene)`), or
                   None; the image tokenizer's evaluation uses it

The core ships one source, "folder" (a user's images with a captions.jsonl, `nmm.data.folder`).
The shapes world and its judge are an application built on the core, so no core module imports
them: `PLUGINS` names the module that defines "shapes", and `data_source` imports it the first time
that source is asked for; the module registers itself, the way Python entry points find plugins.
`data.source=shapes` therefore works from the command line and the library with no extra import.
Another source is one `register_source(name, factory)` call, where `factory(run_config)` builds it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from nmm.config import RunConfig
from nmm.data.folder import ImageFolderSource
from nmm.data.mixture import ImagePool, build_folder_pool
from nmm.errors import ConfigError
from nmm.modalities.codecs import Codecs


class DataSource(Protocol):
    """What `nmm.train.prepare` reads a run's data through (see the module docstring)."""

    world: Any | None
    judge: Any | None

    def texts(self) -> list[str]: ...

    def images(self) -> np.ndarray | None: ...

    def pool(self, codecs: Codecs) -> ImagePool: ...


SourceFactory = Callable[[RunConfig], DataSource]

SOURCES: dict[str, SourceFactory] = {}
# Sources outside the core, by the module that registers them when imported.
PLUGINS: dict[str, str] = {"shapes": "nmm.data.shapes_source"}


def register_source(name: str, factory: SourceFactory) -> None:
    """Make `data.source=NAME` build its source with `factory(run_config)`. Registering the same
    factory again is a no-op (a module may be imported twice); another factory under a taken name
    is an error."""
    known = SOURCES.get(name)
    if known is not None and known is not factory:
        raise ValueError(f"data source {name!r} is already registered with {known.__qualname__}")
    SOURCES[name] = factory


def data_source(cfg: RunConfig, name: str | None = None) -> DataSource:
    """The data source `name` (default: `cfg.data.source`) built for the run `cfg`."""
    name = cfg.data.source if name is None else name
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


class FolderSource:
    """`data.source=folder`: the images and captions of `data.folder`; no world, so no judge."""

    world = None
    judge = None

    def __init__(self, cfg: RunConfig):
        if not cfg.data.folder:
            raise ConfigError("data.source=folder needs data.folder=PATH (a folder with captions.jsonl)")
        self.folder = ImageFolderSource(cfg.data.folder, image_size=cfg.image.image_size)
        self.seed = cfg.data.seed

    def texts(self) -> list[str]:
        return self.folder.captions()

    def images(self) -> np.ndarray:
        return np.stack([self.folder[i][0] for i in range(len(self.folder))])

    def pool(self, codecs: Codecs) -> ImagePool:
        train, _ = self.folder.split(heldout_fraction=0.1, seed=self.seed)  # the rest is for evaluation
        return build_folder_pool(self.folder, codecs, train)


register_source("folder", FolderSource)
