"""Training data: role-mixed documents, pre-tokenised pools, and sequence packing.

Roles (their weights come from `DataConfig.roles`); each is a sampler a data source offers:
  captioning     <image>  caption           loss on the caption        (M2T)
  generation     caption  <image>           loss on the image          (M2G; caption dropped at rate p for CFG)
  qa             <image>  question answer [question answer ...]   loss on the answers (M2T)
  edit           instruction <image> <image'>  loss on the new image   (M2M; instruction first, so that
                 code j of the new image sits a fixed distance after code j of the old one and copying
                 the untouched cells is one relative-position lookup)
  transcription  <audio>  transcript        loss on the text           (speech recognition, M2T)
  synthesis      text  <audio>              loss on the audio          (speech synthesis, M2G; text dropped for CFG)
  tone_captioning, tone_synthesis           the same two directions over the tone world
  text           english paragraph          loss on everything         (keeps the language model a language model)

Batches are a pure function of (seed, rank, batch index): resuming at batch k reproduces the
exact stream, and each rank draws a different shard, without any loader state to save. `pack_rows`
is the one packer; the streamed source (`nmm.data.shards`) packs through it too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from nmm.config import DataConfig
from nmm.modalities.codecs import Codecs
from nmm.modalities.document import Document, ImageSegment, ItemSegment, TextSegment


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T), -100 = no loss
    positions: torch.Tensor  # (B, T), restarting at 0 in each packed document
    doc_ids: torch.Tensor  # (B, T), -1 = padding
    generated: torch.Tensor  # (B, T) bool: image-code positions of images the model learns to produce

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) for t in (self.ids, self.targets, self.positions, self.doc_ids, self.generated)))


class ImagePool:
    """Pre-tokenised images with their captions (and, for the shapes world, scenes and edits)."""

    def __init__(self, codes: np.ndarray, captions: list[str], scenes: list | None = None):
        self.codes, self.captions, self.scenes = codes, captions, scenes
        self.edits: list[tuple[int, str, np.ndarray]] = []  # (source index, instruction, edited codes)

    def __len__(self) -> int:
        return len(self.codes)


def build_shapes_pool(world, codecs: Codecs, n: int, seed: int, split: str = "train", n_edits: int = 0):
    scenes = world.scenes(n, seed, split)
    images = np.stack([world.render(s) for s in scenes])
    pool = ImagePool(codecs.encode_images(images), [world.caption(s) for s in scenes], scenes)
    if n_edits:
        rng = np.random.default_rng([seed, 7])
        pairs = []
        for i in rng.permutation(n):
            edit = world.edit(scenes[i], rng)
            if edit is not None and (split != "train" or not world.has_heldout(edit[1])):
                pairs.append((int(i), edit[0], world.render(edit[1])))
            if len(pairs) == n_edits:
                break
        edited = codecs.encode_images(np.stack([p[2] for p in pairs]))
        pool.edits = [(i, instr, codes) for (i, instr, _), codes in zip(pairs, edited)]
    return pool


def build_folder_pool(source, codecs: Codecs, indices: list[int]) -> ImagePool:
    images = np.stack([source[i][0] for i in indices])
    return ImagePool(codecs.encode_images(images), [source[i][1] for i in indices])


RoleSampler = Callable[[np.random.Generator], Document]  # draws one document of a role


def image_roles(pool: ImagePool, world=None, caption_dropout: float = 0.1, qa_per_image: int = 1,
                input_loss: tuple[str, ...] = (), qa_caption_first: bool = False) -> dict[str, RoleSampler]:
    """The image roles a pool supports: captioning and generation always; qa with a world that asks
    questions about the pool's scenes (up to `qa_per_image` different ones per image, one after the
    other: the image's tokens are paid for once and every answer is a target); edit with edit pairs.
    `input_loss` ("text", "image"): the given segments of those modalities are targets too
    (`DataConfig.input_loss`). `qa_caption_first`: half the qa documents caption the image (a target)
    before the first question, so the model learns to answer from its own description too."""
    text_in, image_in = "text" in input_loss, "image" in input_loss

    def pick(rng) -> int:
        return int(rng.integers(len(pool)))

    def captioning(rng):
        i = pick(rng)
        return Document([ImageSegment(codes=pool.codes[i], loss=image_in), TextSegment(pool.captions[i])], "captioning")

    def generation(rng):
        i = pick(rng)
        image = ImageSegment(codes=pool.codes[i])
        if rng.random() < caption_dropout:
            return Document([image], "generation")  # unconditional: what CFG subtracts at inference
        return Document([TextSegment(pool.captions[i], loss=text_in), image], "generation")

    def qa(rng):
        i = pick(rng)
        turns: dict[str, str] = {}  # question -> answer; a repeated question is asked once
        for _ in range(int(rng.integers(1, qa_per_image + 1))):
            question, answer, _ = world.question_answer(pool.scenes[i], rng)
            turns.setdefault(question, answer)
        segments = [ImageSegment(codes=pool.codes[i], loss=image_in)]
        if qa_caption_first and rng.random() < 0.5:
            segments.append(TextSegment(pool.captions[i]))
        for question, answer in turns.items():
            segments += [TextSegment(question, loss=text_in), TextSegment(answer)]
        return Document(segments, "qa")

    def edit(rng):
        src, instruction, edited = pool.edits[rng.integers(len(pool.edits))]
        return Document([TextSegment(instruction, loss=text_in), ImageSegment(codes=pool.codes[src], loss=image_in),
                         ImageSegment(codes=edited)], "edit")

    roles = {"captioning": captioning, "generation": generation}
    if world is not None and pool.scenes is not None:
        roles["qa"] = qa
    if pool.edits:
        roles["edit"] = edit
    return roles


def text_role(english: list[str]) -> dict[str, RoleSampler]:
    """Plain English paragraphs with loss on everything (keeps the language model a language model)."""
    if not english:
        return {}
    return {"text": lambda rng: Document([TextSegment(english[rng.integers(len(english))])], "text")}


class TranscriptPool:
    """Pre-tokenised items of one modality with their texts: recordings and transcripts (audio, the
    default), clips and captions (video). Ids: one 1-D array per item."""

    def __init__(self, texts: list[str], codes: list[np.ndarray], modality: str = "audio"):
        if len(texts) != len(codes):
            raise ValueError(f"got {len(texts)} transcripts but {len(codes)} clips")
        self.texts, self.codes, self.modality = texts, codes, modality

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def encode(cls, codecs: Codecs, texts: list[str], waves: list[np.ndarray]) -> TranscriptPool:
        return cls(list(texts), codecs.encode_items("audio", waves))

    @classmethod
    def rendered(cls, codecs: Codecs, texts: list[str], render: Callable[[int], np.ndarray],
                 chunk: int = 256) -> tuple[TranscriptPool, list[int]]:
        """Render item i with `render(i)` and encode, `chunk` at a time (the waveforms are not kept).
        Items longer than the codec takes (a long caption in a slow voice) are left out: returns the
        pool and the indices into `texts` it kept."""
        limit = codecs.codec("audio").config.max_seconds * codecs.codec("audio").config.sample_rate
        kept, codes = [], []
        for start in range(0, len(texts), chunk):
            waves = [(i, render(i)) for i in range(start, min(start + chunk, len(texts)))]
            waves = [(i, w) for i, w in waves if len(w) <= limit]
            kept += [i for i, _ in waves]
            codes += codecs.encode_items("audio", [w for _, w in waves])
        return cls([texts[i] for i in kept], codes), kept


def speech_roles(pool: TranscriptPool, caption_dropout: float,
                 names: tuple[str, str] = ("transcription", "synthesis")) -> dict:
    """The two directions over items paired with text, drawn uniformly from `pool` (role names
    `names`: speech's by default, the tone world's are tone_captioning / tone_synthesis, video's
    video_captioning / text_to_clip):
      transcription  <audio> transcript   loss on the text   (speech recognition)
      synthesis      text <audio>         loss on the audio  (speech synthesis; the text is dropped at
                                                              `caption_dropout`, for classifier-free guidance)"""
    if len(pool) == 0:
        raise ValueError("speech_roles needs at least one pre-tokenised clip")
    read, write = names

    def transcription(rng) -> Document:
        i = int(rng.integers(len(pool)))
        return Document([ItemSegment(pool.modality, codes=pool.codes[i], loss=False), TextSegment(pool.texts[i])], read)

    def synthesis(rng) -> Document:
        i = int(rng.integers(len(pool)))
        audio = ItemSegment(pool.modality, codes=pool.codes[i])
        if rng.random() < caption_dropout:
            return Document([audio], write)  # unconditional audio, for classifier-free guidance
        return Document([TextSegment(pool.texts[i], loss=False), audio], write)

    return {read: transcription, write: synthesis}


# Every role a built-in source can offer. A weighted role missing from a run's sources is dropped
# (a folder of images has no questions); a name outside this list and the run's roles is a typo.
KNOWN_ROLES = ("captioning", "generation", "qa", "edit", "text",
               "transcription", "synthesis", "spoken_qa", "tone_captioning", "tone_synthesis",
               "spoken_generation", "video_captioning", "text_to_clip", "video_qa",
               "clip_continuation")
# The modality each built-in role teaches the model to write (besides text): a model whose interface for
# it cannot generate (late / mid fusion, continuous audio) must not be given that role.
ROLE_WRITES = {"generation": "image", "edit": "image", "spoken_generation": "image", "synthesis": "audio",
               "tone_synthesis": "audio", "text_to_clip": "video", "clip_continuation": "video"}


class DocumentMixture:
    """Draws documents of each role with the configured weights (`DataConfig.roles`)."""

    def __init__(self, cfg: DataConfig, codecs: Codecs, roles: dict[str, RoleSampler],
                 english: list[str] = (), pool: ImagePool | None = None, world=None):
        self.cfg, self.codecs, self.pool, self.world = cfg, codecs, pool, world
        available = {**roles, **text_role(list(english))}
        for r in cfg.roles:
            if r not in available and r not in KNOWN_ROLES:
                raise ValueError(f"data.roles: unknown role '{r}' (known: {', '.join(sorted({*KNOWN_ROLES, *available}))})")
        weighted = {r: w for r, w in cfg.roles.items() if w > 0 and r in available}
        if not weighted:
            raise ValueError(f"data.roles leaves no role with data to train on (this data offers: "
                             f"{', '.join(sorted(available)) or 'nothing'})")
        self.samplers = {r: available[r] for r in weighted}
        self.roles = list(weighted)
        w = np.array([weighted[r] for r in self.roles], dtype=np.float64)
        self.weights = w / w.sum()

    def sample(self, rng: np.random.Generator) -> Document:
        return self.samplers[self.roles[rng.choice(len(self.roles), p=self.weights)]](rng)


# A row whose free tail is shorter than this is closed: no document is that short.
MIN_TAIL = 8

Encoded = tuple[list[int], list[bool]]  # a document's ids and is_target (`Codecs.encode_document`)


def pack_rows(draw: Callable[[int], Encoded], batch_size: int, seq_len: int, vocab, max_misses: int = 8,
              put_back: Callable[[list[int], list[bool]], None] | None = None) -> Batch:
    """Lay documents end to end in (batch_size, seq_len) rows: the one packer of nmm.

    `draw(room)` gives the next document as (ids, is_target); `room` is the free tail of the row,
    for a source that can pick a document that fits (a pool's sampler ignores it). A document
    longer than a row is cut, not dropped. One that does not fit the free tail is a miss, and the
    row closes after `max_misses` of them (another draw may fit: short ones fill the tail). A miss
    is dropped, or, with `put_back(ids, is_target)` (streams, where every sample counts:
    `nmm.data.shards`), handed back for the source to give again when it fits.
    Each document gets positions from 0, its index in the row (`doc_ids`), next-token targets inside
    the document only (its last token predicts nothing), and `generated` marks on the item codes it
    learns to produce. Padding: `vocab.pad`, doc_id -1, no target."""
    B, T = batch_size, seq_len
    ids = np.full((B, T), vocab.pad, dtype=np.int64)
    targets = np.full((B, T), -100, dtype=np.int64)
    positions = np.zeros((B, T), dtype=np.int64)
    doc_ids = np.full((B, T), -1, dtype=np.int64)
    generated = np.zeros((B, T), dtype=bool)
    for row in range(B):
        fill, doc_index, misses = 0, 0, 0
        while misses < max_misses and T - fill >= MIN_TAIL:
            tokens, is_target = draw(T - fill)
            tokens, is_target = tokens[:T], is_target[:T]  # an over-long document is cut, not dropped
            n = len(tokens)
            if fill + n > T:  # doesn't fit: try a few more draws (short ones fill the tail)
                if put_back is not None:
                    put_back(tokens, is_target)
                misses += 1
                continue
            ids[row, fill : fill + n] = tokens
            nxt = np.array(tokens[1:], dtype=np.int64)
            targets[row, fill : fill + n - 1] = np.where(np.array(is_target[1:]), nxt, -100)
            positions[row, fill : fill + n] = np.arange(n)
            doc_ids[row, fill : fill + n] = doc_index
            generated[row, fill : fill + n] = vocab.is_code(np.array(tokens)) & np.array(is_target)
            fill, doc_index = fill + n, doc_index + 1
    return Batch(*(torch.from_numpy(a) for a in (ids, targets, positions, doc_ids, generated)))


class PackedBatches:
    """Packs documents into (batch_size, seq_len) rows; batch k is a pure function of (seed, rank, k).

    The trainer reads data through `batch(index)`, `state_dict()` and `load_state_dict(state)`,
    which `nmm.data.shards.StreamingBatches` offers too. Here the state is empty: any batch can be
    recomputed from its index, so resuming needs nothing saved."""

    def __init__(self, mixture: DocumentMixture, batch_size: int, seq_len: int, seed: int, rank: int = 0):
        self.mixture, self.batch_size, self.seq_len = mixture, batch_size, seq_len
        self.seed, self.rank = seed, rank
        self.pad = mixture.codecs.vocab.pad
        self.max_misses = 8

    def batch(self, index: int) -> Batch:
        rng = np.random.default_rng([self.seed, self.rank, index])
        codecs = self.mixture.codecs
        return pack_rows(lambda room: codecs.encode_document(self.mixture.sample(rng)), self.batch_size,
                         self.seq_len, codecs.vocab, self.max_misses)

    def state_dict(self) -> dict:
        """Nothing: batch k is a pure function of (seed, rank, k)."""
        return {}

    def load_state_dict(self, state: dict | None) -> None:
        """Accepts the empty state `state_dict` gives (or None, from a checkpoint that has none)."""
        if state:
            raise ValueError(f"PackedBatches keeps no loader state, got {sorted(state)} (a checkpoint of a streamed run?)")
