"""Everything a run needs before the language model trains: tokenizers and data pools.

Codecs are trained once per run directory (rank 0) and reused on resume or by other ranks. The
data comes from the source `data.source` names (`nmm.data.sources`): this module never knows
which world, if any, is behind it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from nmm.config import RunConfig
from nmm.data.mixture import DocumentMixture
from nmm.data.sources import data_source
from nmm.errors import ConfigError
from nmm.modalities.base import modality_plugin
from nmm.modalities.codecs import Codecs
from nmm.modalities.text import TextTokenizer, english_corpus
from nmm.utils import atomic_write_json


def make_world(cfg: RunConfig):
    """The shapes world at the run's image size and shape counts (the world of `data.source=shapes`)."""
    return data_source(cfg, "shapes").world


def english_paragraphs(cfg: RunConfig, split: str = "train") -> list[str]:
    paras = [p.lower() for p in english_corpus(split)]
    return paras[: cfg.text.english_paragraphs] if split == "train" else paras


def prepare_codecs(cfg: RunConfig, run_dir: Path, progress=None, log=print) -> tuple[Codecs, dict]:
    """Train (or load, if already in run_dir) the text tokenizer and one codec per modality of the
    run's data source. `progress(name)` gives the progress callback for modality `name`'s training.
    Stats: `text_vocab_size`, and per modality its trainer's stats under its name."""
    run_dir = Path(run_dir)
    if (run_dir / "vocab.json").exists():
        stats_path = run_dir / "tokenizer_stats.json"
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
        return Codecs.load(run_dir), stats

    t0 = time.time()
    english = english_paragraphs(cfg)
    source = data_source(cfg)
    text_tok = TextTokenizer.train(source.texts() + english, vocab_size=cfg.text.vocab_size)
    log(f"text tokenizer: {text_tok.vocab_size} BPE tokens ({time.time() - t0:.1f}s)")
    stats: dict = {"text_vocab_size": text_tok.vocab_size}
    codecs = []
    for name in source.modalities:
        plugin = modality_plugin(name)
        if plugin.train is None:
            raise ConfigError(f"data.source={cfg.data.source} holds {name} items, but the {name} plugin cannot train a codec")
        part = source.part(name) if hasattr(source, "part") else source
        codec, stats[name] = plugin.train(cfg, part, progress=progress(name) if progress else None)
        codecs.append(codec)
    codecs = Codecs(text_tok, *codecs)
    codecs.save(run_dir)
    atomic_write_json(run_dir / "tokenizer_stats.json", stats)
    return codecs, stats


def prepare_mixture(cfg: RunConfig, codecs: Codecs, source=None) -> DocumentMixture:
    source = data_source(cfg) if source is None else source
    roles = source.roles(codecs, cfg.data)
    return DocumentMixture(cfg.data, codecs, roles, english=english_paragraphs(cfg), pool=source.image_pool,
                           world=source.world)
