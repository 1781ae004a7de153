"""`data.source=moving_shapes`: clips of the shapes world in motion (nmm.data.moving_shapes) and their
judge (nmm.eval.clip_judge) as a data source of the core.

The core does not import this module: `nmm.data.sources.PLUGINS` names it, and the registry imports
it the first time the source is asked for.

Roles (`data.roles`):
  video_captioning  <video> caption            loss on the caption   (M2T)
  text_to_clip      caption <video>            loss on the clip      (M2G; the caption dropped at
                                                                      data.caption_dropout, for CFG)
  video_qa          <video> question answer    loss on the answer    (M2T)
  clip_continuation <video: first frames | the rest>  loss on the rest (the world-model task: what
                                                    happens next; `continuation_split`)
"""

from __future__ import annotations

import numpy as np

from nmm.config import DataConfig, RunConfig
from nmm.data.mixture import RoleSampler, TranscriptPool, speech_roles
from nmm.data.moving_shapes import MovingShapesWorld
from nmm.data.shapes import ShapesWorld
from nmm.data.sources import register_source
from nmm.eval.clip_judge import ClipJudge
from nmm.eval.judge import ShapesJudge
from nmm.modalities.codecs import Codecs
from nmm.modalities.document import Document, ItemSegment, TextSegment

TOKENIZER_CLIPS = 2000  # clips whose captions and questions train the text tokenizer
ROLE_NAMES = ("video_captioning", "text_to_clip")


def make_moving_world(cfg: RunConfig) -> MovingShapesWorld:
    world = ShapesWorld(image_size=cfg.image.image_size, min_shapes=cfg.data.min_shapes, max_shapes=cfg.data.max_shapes)
    return MovingShapesWorld(world, frames=cfg.video.frames)


class MovingShapesSource:
    """Unlimited clips with exact ground truth: shapes move, appear, disappear and change colour;
    the clip judge reads frames back into what happened."""

    modalities = ("video",)
    image_pool = None

    def __init__(self, cfg: RunConfig):
        self.moving = make_moving_world(cfg)
        self.world = self.moving.world  # the frame tokenizer trains and is judged on its scenes
        self.judge = ShapesJudge(self.world)
        self.clip_judge = ClipJudge(self.moving)
        self.seed, self.pool_size = cfg.data.seed, cfg.data.video_pool_size
        self.frame_images = cfg.image.pool_size
        self.pool: TranscriptPool | None = None
        self.clips = None

    def texts(self) -> list[str]:
        rng = np.random.default_rng([self.seed, 5])
        texts = []
        for clip in self.moving.clips(TOKENIZER_CLIPS, self.seed, "any"):
            q, a, _ = self.moving.question_answer(clip, rng)
            texts += [self.moving.caption(clip), f"{q} {a}"]
        return texts

    def images(self) -> np.ndarray:
        """Frames of training clips for the frame tokenizer: (n, H, W, 3) uint8."""
        n = max(1, self.frame_images // self.moving.frames)
        return np.concatenate([self.moving.render(c) for c in self.moving.clips(n, self.seed + 2, "train")])

    def clips_frames(self, n: int) -> np.ndarray:
        """(n, F, H, W, 3) uint8 clips of any split, for the codec's statistics."""
        return np.stack([self.moving.render(c) for c in self.moving.clips(n, self.seed + 3, "any")])

    def score_reconstructions(self, codec, n: int = 200) -> dict:
        """Clips through the codec and back, read by the clip judge: the ceiling of clip generation."""
        clips = self.moving.clips(n, self.seed + 3, "any")
        frames = codec.decode(codec.encode(np.stack([self.moving.render(c) for c in clips])))
        scores = [self.clip_judge.score(f, c) for f, c in zip(frames, clips)]
        return {k: float(np.mean([s[k] for s in scores])) for k in scores[0] if isinstance(scores[0][k], (bool, int, float))}

    def roles(self, codecs: Codecs, cfg: DataConfig) -> dict[str, RoleSampler]:
        clips = self.moving.clips(self.pool_size, self.seed + 1, "train")
        codec = codecs.codec("video")
        codes, kept = [], []
        for start in range(0, len(clips), 256):
            chunk = clips[start : start + 256]
            ids = codecs.encode_items("video", np.stack([self.moving.render(c) for c in chunk]))
            for i, x in enumerate(ids):
                if len(x) <= codec.max_tokens:  # longer clips than the model may write are left out
                    codes.append(np.asarray(x))
                    kept.append(start + i)
        self.clips = [clips[i] for i in kept]
        self.pool = TranscriptPool([self.moving.caption(c) for c in self.clips], codes, modality="video")
        roles = speech_roles(self.pool, cfg.caption_dropout, names=ROLE_NAMES)
        pool, moving = self.pool, self.moving

        def video_qa(rng) -> Document:
            i = int(rng.integers(len(pool)))
            question, answer, _ = moving.question_answer(self.clips[i], rng)
            return Document([ItemSegment("video", codes=pool.codes[i], loss=False), TextSegment(question, loss=False),
                             TextSegment(answer)], "video_qa")

        def clip_continuation(rng) -> Document:
            i = int(rng.integers(len(pool)))
            given = continuation_split(codecs, pool.codes[i])
            return Document([ItemSegment("video", codes=pool.codes[i], loss_from=given)], "clip_continuation")

        return {**roles, "video_qa": video_qa, "clip_continuation": clip_continuation}


def continuation_split(codecs: Codecs, ids: np.ndarray, frames_given: int | None = None) -> int:
    """How many of a clip's ids show its first half (`frames_given` frames): for a delta clip, up to the
    mark that opens the next frame; for full / stride, that many frames' codes."""
    codec = codecs.codec("video")
    given = frames_given if frames_given is not None else codec.config.frames // 2
    if codec.config.layout != "delta":
        per = codec.spec.tokens_per_item // (codec.config.frames // (codec.config.stride if codec.config.layout == "stride" else 1))
        kept = given // (codec.config.stride if codec.config.layout == "stride" else 1)
        return kept * per
    marks = np.flatnonzero(codecs.vocab.codes("video", np.asarray(ids)) == codec.mark)
    return int(marks[given - 1]) if len(marks) >= given else len(ids)


register_source("moving_shapes", MovingShapesSource)
