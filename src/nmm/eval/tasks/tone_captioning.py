"""Tone captioning (M2T): a melody of the tone world plays; the model writes its caption
("slow square : c4 short e4 long"), which is parsed back into a scene and compared with the truth.

Splits: "heldout" is fresh scenes of the training distribution (drawn with the evaluation's seed,
so new draws, though a short melody may coincide with one trained on); "heldout_combo" has at least
one (timbre, pitch) combination that never appeared in training.

Metrics (means over scenes; an unparseable caption scores 0 on all of them):
  exact     the caption is entirely right (every note's pitch and duration, their number, timbre, tempo)
  note      position-aligned share of notes with pitch and duration right, over the longer of the
            true and the written sequence (an extra or a missing note costs a position)
  pitch     the same for pitch alone
  count     the number of notes is right
  timbre, tempo   that attribute is right
  parsed    the output parses as a caption at all
The same definitions as `PitchJudge.score`, so captioning and synthesis are read on one scale.
Headline: exact.
"""

from __future__ import annotations

import numpy as np

from nmm.data.tones import PITCHES, ToneScene, ToneWorld
from nmm.data.tones_source import make_tone_world
from nmm.eval.speech import spectrograms, wav_data_uri
from nmm.eval.task import EvalContext, SplitResult, Task, register

SPLITS = ("heldout", "heldout_combo")
WORLD_SPLIT = {"heldout": "train", "heldout_combo": "heldout_combo"}  # eval split -> the world's split
METRICS = ("exact", "note", "pitch", "count", "timbre", "tempo")
REPORT_AUDIO = 12  # examples with a player in the report


def tone_world(ctx: EvalContext) -> ToneWorld:
    if "tone_world" not in ctx.memo:
        ctx.memo["tone_world"] = make_tone_world(ctx.cfg)
    return ctx.memo["tone_world"]


def tone_scenes(ctx: EvalContext, task: str, split: str) -> list[ToneScene]:
    if split not in WORLD_SPLIT:
        raise ValueError(f"unknown split {split!r} for {task}; expected one of {SPLITS}")
    return tone_world(ctx).scenes(ctx.ec.n_samples, ctx.seed(task, split), WORLD_SPLIT[split])


def compare(target: ToneScene, got: ToneScene | None) -> dict:
    """`PitchJudge.score`'s verdict for a scene read some other way (here: a parsed caption)."""
    notes = got.notes if got is not None else ()
    denom = max(len(notes), len(target.notes))
    return {"count": len(notes) == len(target.notes),
            "pitch": sum(a.pitch == b.pitch for a, b in zip(notes, target.notes)) / denom,
            "note": sum(a == b for a, b in zip(notes, target.notes)) / denom,
            "tempo": got is not None and got.tempo == target.tempo,
            "timbre": got is not None and got.timbre == target.timbre,
            "exact": got == target}


def pitch_confusion(targets: list[ToneScene], got: list[ToneScene | None]) -> dict:
    """Counts of (true pitch, pitch at the same position of the output); "none" = no note there."""
    labels = list(PITCHES)
    columns = [*labels, "none"]
    matrix = np.zeros((len(labels), len(columns)), dtype=int)
    for target, read in zip(targets, got):
        notes = read.notes if read is not None else ()
        for j, note in enumerate(target.notes):
            value = notes[j].pitch if j < len(notes) else "none"
            matrix[labels.index(note.pitch), columns.index(value)] += 1
    return {"labels": labels, "predicted_labels": columns, "matrix": matrix.tolist()}


def tone_metrics(ctx: EvalContext, task: str, split: str, rows: list[dict], extra: tuple[str, ...] = ()) -> dict:
    return {m: ctx.mean([float(r[m]) for r in rows], task, split, m) for m in (*METRICS, *extra)}


@register
class ToneCaptioning(Task):
    name = "tone_captioning"
    title = "melody -> caption; exact match and per-note accuracy (held-out combinations too)"
    kind = "M2T"
    modalities = ("text", "audio")
    world = "tones"
    splits = SPLITS
    flat_prefix = "tcap"
    headline = ("exact", "note")
    report_samples = REPORT_AUDIO

    def build(self, ctx: EvalContext, split: str) -> list[tuple[ToneScene, np.ndarray]]:
        world = tone_world(ctx)
        return [(s, world.render(s)) for s in tone_scenes(ctx, self.name, split)]

    def predict(self, ctx: EvalContext, items) -> list[str]:
        world = tone_world(ctx)
        # Room for the longest true caption and then some: enough to be right, not a limit on rambling.
        room = max(48, max((len(ctx.pipe.codecs.encode_text(world.caption(s))) for s, _ in items), default=0) + 8)
        out: list[str] = []
        for chunk in ctx.chunks(items):  # greedy: a caption has one right answer
            out += ctx.pipe.transcribe([w for _, w in chunk], batch_size=len(chunk), max_new_tokens=room)
        return out

    def oracle(self, ctx: EvalContext, items) -> list[str]:
        world = tone_world(ctx)
        return [world.caption(s) for s, _ in items]

    def score(self, ctx: EvalContext, split: str, items, outputs: list[str]) -> SplitResult:
        world = tone_world(ctx)
        scenes = [s for s, _ in items]
        parsed = [world.parse_caption(text) for text in outputs]
        rows = [{**compare(s, p), "parsed": p is not None, "caption": text, "target": world.caption(s)}
                for s, text, p in zip(scenes, outputs, parsed)]
        metrics = tone_metrics(ctx, self.name, split, rows, ("parsed",))
        k = self.report_samples
        samples = [{"title": f"{r['target']} → {r['caption'] or '(nothing)'}", "ok": bool(r["exact"]),
                    "target": r["target"], "caption": r["caption"], "note": float(r["note"]),
                    "audio": wav_data_uri(w)}
                   for r, (_, w) in zip(rows[:k], items[:k])]
        return SplitResult(metrics, samples, spectrograms([w for _, w in items[:k]]),
                           {"pitch": pitch_confusion(scenes, parsed)}, extra={"rows": rows})
