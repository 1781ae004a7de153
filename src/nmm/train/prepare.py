"""Everything a run needs before the language model trains: tokenizers and data pools.

Codecs are trained once per run directory (rank 0) and reused on resume or by other ranks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from nmm.config import RunConfig
from nmm.data.folder import ImageFolderSource
from nmm.data.mixture import DocumentMixture, build_folder_pool, build_shapes_pool
from nmm.data.shapes import ShapesWorld
from nmm.errors import ConfigError
from nmm.modalities.codecs import Codecs
from nmm.modalities.image import train_image_tokenizer
from nmm.modalities.text import TextTokenizer, english_corpus
from nmm.utils import atomic_write_json


def make_world(cfg: RunConfig) -> ShapesWorld:
    return ShapesWorld(image_size=cfg.image.image_size, min_shapes=cfg.data.min_shapes, max_shapes=cfg.data.max_shapes)


def make_folder(cfg: RunConfig) -> ImageFolderSource:
    if not cfg.data.folder:
        raise ConfigError("data.source=folder needs data.folder=PATH (a folder with captions.jsonl)")
    return ImageFolderSource(cfg.data.folder, image_size=cfg.image.image_size)


def english_paragraphs(cfg: RunConfig, split: str = "train") -> list[str]:
    paras = [p.lower() for p in english_corpus(split)]
    return paras[: cfg.text.english_paragraphs] if split == "train" else paras


def world_texts(world: ShapesWorld, n: int, seed: int) -> list[str]:
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


def prepare_codecs(cfg: RunConfig, run_dir: Path, progress=None, log=print) -> tuple[Codecs, dict]:
    """Train (or load, if already in run_dir) the text and image tokenizers."""
    run_dir = Path(run_dir)
    if (run_dir / "vocab.json").exists():
        stats_path = run_dir / "tokenizer_stats.json"
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
        return Codecs.load(run_dir), stats

    t0 = time.time()
    english = english_paragraphs(cfg)
    if cfg.data.source == "shapes":
        world = make_world(cfg)
        texts = world_texts(world, 3000, cfg.data.seed) + english
        images = None
    elif cfg.data.source == "folder":
        world, source = None, make_folder(cfg)
        texts = source.captions() + english
        images = np.stack([source[i][0] for i in range(len(source))])
    else:
        raise ConfigError(f"data.source: unknown source '{cfg.data.source}' (shapes | folder)")
    text_tok = TextTokenizer.train(texts, vocab_size=cfg.text.vocab_size)
    log(f"text tokenizer: {text_tok.vocab_size} BPE tokens ({time.time() - t0:.1f}s)")

    image_tok, stats = train_image_tokenizer(world, cfg.image, seed=cfg.data.seed, progress=progress, images=images)
    stats = {"text_vocab_size": text_tok.vocab_size, **stats}
    codecs = Codecs(text_tok, image_tok)
    codecs.save(run_dir)
    atomic_write_json(run_dir / "tokenizer_stats.json", stats)
    return codecs, stats


def prepare_mixture(cfg: RunConfig, codecs: Codecs) -> DocumentMixture:
    english = english_paragraphs(cfg)
    if cfg.data.source == "shapes":
        world = make_world(cfg)
        n = cfg.data.pool_size
        pool = build_shapes_pool(world, codecs, n, cfg.data.seed + 1, "train", n_edits=n // 4)
        return DocumentMixture(cfg.data, codecs, pool, world=world, english=english)
    source = make_folder(cfg)
    train_idx, _ = source.split(heldout_fraction=0.1, seed=cfg.data.seed)
    pool = build_folder_pool(source, codecs, train_idx)
    return DocumentMixture(cfg.data, codecs, pool, world=None, english=english)
