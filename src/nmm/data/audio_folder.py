"""Training data from a user's own recordings: audio files plus a ``transcripts.jsonl`` index.

Layout::

    my_speech/
        transcripts.jsonl     one JSON object per line: {"file": "alice/001.wav", "text": "hello there"}
        alice/001.wav         audio paths are relative to the folder (absolute paths work too)

Any format libsndfile reads works (WAV, FLAC, OGG, ...), at any sample rate and channel count:
each clip is mixed down to mono and resampled to 16 kHz (`nmm.modalities.audio.read_audio`), and
how many clips needed that is reported as a note, not an error. A line may carry other keys
besides "file" and "text" (say "speaker" or "id"): they are allowed, kept in `AudioFolder.extras`,
and not used for training.

Transcripts are kept as written (case and punctuation are what the model learns to produce),
with Unicode normalised to NFC and runs of whitespace collapsed to one space.

Unlike an image folder, a folder of recordings is rarely clean: a clip cut short by a full disk,
a transcript never typed in, a take far longer than the rest. So no single bad item stops the
load. Each is skipped with a reason naming its file (or its line of transcripts.jsonl), the rest
loads, and `AudioFolder.summary` says what happened, e.g.

    loaded 97 of 100 items; skipped 3: 2 unreadable (a.wav, b.wav), 1 empty transcript (line 7)

Only when nothing at all loads is it an error (`InputError`, naming the folder and the reasons).
The waveforms are kept in memory at 16 kHz (an hour of audio is 230 MB), so every clip is read
and checked once, when the source is built, rather than hours into a training run.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from nmm.errors import InputError
from nmm.modalities.audio import read_audio
from nmm.modalities.audio_features import SAMPLE_RATE

TRANSCRIPTS_FILE = "transcripts.jsonl"
# The codec's log-mel needs at least half an FFT window of samples (shorter input fails inside the
# STFT), and a clip under 50 ms holds no speech anyway.
MIN_SECONDS = 0.05
# Kinds of skipped item, in the order the summary lists them.
REASONS = ("bad JSON", "bad field", "empty transcript", "missing file", "unreadable", "truncated",
           "too long", "too short")
SUMMARY_NAMES = 5  # names listed per reason in the summary; the rest are counted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skipped:
    """One item left out of the load: `reason` is one of `REASONS`, `name` what the summary lists
    (the audio file, or "line N" for a problem with the line itself), `message` the full story."""

    reason: str
    name: str
    message: str


class AudioFolder:
    """(waveform, transcript) pairs from a folder with a ``transcripts.jsonl`` file.

    `len(folder)` items loaded out of `folder.listed` lines; `folder.skipped` lists the rest, and
    `folder.notes` counts what was changed to load a clip ("resampled 44100 -> 16000 Hz": 3)."""

    def __init__(self, root: str | Path, max_seconds: float = 6.0):
        self.root = Path(root)
        self.max_seconds = max_seconds
        if not self.root.is_dir():
            raise InputError(f"audio folder not found: {self.root}")
        self.paths: list[Path] = []
        self.extras: list[dict] = []  # each line's keys other than "file" and "text"
        self._texts: list[str] = []
        self._waves: list[np.ndarray] = []
        self.skipped: list[Skipped] = []
        self.notes: Counter[str] = Counter()
        self.listed = 0

        for line_number, record in self._records(self.root / TRANSCRIPTS_FILE):
            self.listed += 1
            if record is not None:
                self._load(line_number, record)

        self.summary = self._summarise()
        if not self._texts:
            # Nothing to train on: the one case that is an error, with every reason in it.
            details = "\n  ".join(s.message for s in self.skipped)
            raise InputError(f"no usable recordings in audio folder {self.root}: {self.summary}\n  {details}")
        if self.skipped:
            log.warning("audio folder %s: %s", self.root, self.summary)
            for s in self.skipped:
                log.warning("  skipped: %s", s.message)
        else:
            log.info("audio folder %s: %s", self.root, self.summary)

    def __len__(self) -> int:
        return len(self._texts)

    def __getitem__(self, i: int) -> tuple[np.ndarray, str]:
        """The i-th clip as a float32 mono waveform at 16 kHz, and its transcript."""
        # A copy, so a caller editing the wave in place cannot corrupt the stored one.
        return self._waves[i].copy(), self._texts[i]

    def transcripts(self) -> list[str]:
        """All transcripts in file order, e.g. to train the text tokenizer."""
        return list(self._texts)

    def waves(self, indices: list[int] | None = None) -> list[np.ndarray]:
        """The waveforms at `indices` (default: all), copies."""
        indices = range(len(self)) if indices is None else indices
        return [self._waves[i].copy() for i in indices]

    def seconds(self) -> float:
        """Total duration of the loaded clips."""
        return sum(len(w) for w in self._waves) / SAMPLE_RATE

    def split(self, heldout_fraction: float = 0.1, seed: int = 0) -> tuple[list[int], list[int]]:
        """Deterministically split indices into (train, heldout), each sorted (as `ImageFolderSource.split`)."""
        if not 0 <= heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
        n = len(self)
        n_heldout = round(n * heldout_fraction)
        if heldout_fraction > 0 and n >= 2:
            # Keep at least one clip on each side, so evaluation always has something to score.
            n_heldout = min(max(n_heldout, 1), n - 1)
        order = np.random.default_rng(seed).permutation(n)
        return sorted(order[n_heldout:].tolist()), sorted(order[:n_heldout].tolist())

    # ---- loading --------------------------------------------------------------------------------
    def _skip(self, reason: str, name: str, message: str) -> None:
        self.skipped.append(Skipped(reason, name, message))

    def _records(self, path: Path):
        """(line number, parsed object or None if the line was skipped) for each non-blank line."""
        return read_index(path, '{"file": "clip.wav", "text": "what is said"}', "recordings", self._skip, "transcripts")

    def _load(self, line_number: int, record: dict) -> None:
        where = f"{TRANSCRIPTS_FILE}:{line_number}"
        file, text = record.get("file"), record.get("text")
        if not isinstance(file, str) or not file.strip():
            self._skip("bad field", f"line {line_number}", f'{where}: missing or empty "file" field')
            return
        if not isinstance(text, str):
            problem = "missing" if text is None else f"not a string ({type(text).__name__})"
            self._skip("bad field", f"line {line_number}", f'{where}: {file}: "text" field is {problem}')
            return
        text = normalise_transcript(text)
        if not text:
            self._skip("empty transcript", f"line {line_number}", f'{where}: {file}: empty "text" (transcript)')
            return
        path = self.root / file
        if not path.is_file():
            self._skip("missing file", file, f"{where}: audio file not found: {path}")
            return
        info = _info(path)
        # The header gives the length: an hour-long take is turned down without decoding it.
        if info is not None and info.samplerate > 0 and self._too_long(info.frames / info.samplerate, file, where):
            return
        try:
            wave, notes = read_audio(path, file)
        except ValueError as e:  # read_audio's message already names the file
            self._skip("unreadable", file, f"{where}: {e}")
            return
        cut = _truncation(info)
        if cut:
            self._skip("truncated", file, f"{where}: {file}: truncated ({cut})")
            return
        seconds = len(wave) / SAMPLE_RATE
        if self._too_long(seconds, file, where):
            return
        if seconds < MIN_SECONDS:
            self._skip("too short", file, f"{where}: {file}: {seconds * 1000:.0f} ms is shorter than "
                                          f"{MIN_SECONDS * 1000:.0f} ms")
            return
        self.notes.update(notes)
        self.paths.append(path)
        self.extras.append({k: v for k, v in record.items() if k not in ("file", "text")})
        self._texts.append(text)
        self._waves.append(wave)

    def _too_long(self, seconds: float, file: str, where: str) -> bool:
        if seconds <= self.max_seconds:
            return False
        self._skip("too long", file, f"{where}: {file}: {seconds:.2f} s is longer than "
                                     f"audio.max_seconds={self.max_seconds:g} (split it, or raise the limit)")
        return True

    def _summarise(self) -> str:
        return summarise(len(self._texts), self.listed, self.skipped, self.notes, REASONS)


def read_index(path: Path, example: str, nothing: str, skip: Callable[[str, str, str], None],
               what: str = "captions") -> Iterator[tuple[int, dict | None]]:
    """(line number, parsed object, or None where the line was skipped via `skip(reason, name,
    message)`) for each non-blank line of a JSON-lines index. A missing, unreadable or empty file
    is an `InputError` (`example` shows one line, `nothing` ends "PATH lists no ...", `what` names the
    file: "captions", "transcripts"). Shared by the folder sources of audio and video."""
    if not path.is_file():
        raise InputError(f"{what} file not found: {path} (one JSON object per line: {example})")
    try:
        # utf-8-sig: editors on Windows like to start files with a byte-order mark.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from e
    # split("\n"), not splitlines(): the latter also splits on characters valid inside JSON strings.
    lines = [(n, line) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not lines:
        raise InputError(f"{path} lists no {nothing}")
    for line_number, line in lines:
        where = f"{path.name}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            skip("bad JSON", f"line {line_number}", f"{where}: invalid JSON ({e.msg})")
            yield line_number, None
            continue
        if not isinstance(record, dict):
            skip("bad JSON", f"line {line_number}", f"{where}: expected an object like {example}")
            record = None
        yield line_number, record


def summarise(loaded: int, listed: int, skipped: list[Skipped], notes: Counter, reasons: tuple[str, ...]) -> str:
    """The one-line account of a load, e.g. "loaded 3 of 5 items; skipped 2: 1 missing file (a.mp4),
    1 unreadable (b.mp4); notes: 3 cut to the first 2 s" (reasons in the order of `reasons`)."""
    out = f"loaded {loaded} of {listed} items"
    if skipped:
        by_reason: dict[str, list[str]] = {}
        for s in skipped:
            by_reason.setdefault(s.reason, []).append(s.name)
        parts = []
        for reason in reasons:
            names = by_reason.get(reason, [])
            if names:
                shown = ", ".join(names[:SUMMARY_NAMES])
                more = f", and {len(names) - SUMMARY_NAMES} more" if len(names) > SUMMARY_NAMES else ""
                parts.append(f"{len(names)} {reason} ({shown}{more})")
        out += f"; skipped {len(skipped)}: " + ", ".join(parts)
    if notes:
        out += "; notes: " + ", ".join(f"{count} {note}" for note, count in sorted(notes.items()))
    return out



def normalise_transcript(text: str) -> str:
    """NFC Unicode, surrounding whitespace stripped, inner runs of whitespace (newlines, tabs) as one space."""
    return " ".join(unicodedata.normalize("NFC", text).split())


# libsndfile reads a WAV (or AIFF, ...) whose audio was cut short without an error, returning only
# the samples that are there; its header log shows it as e.g. "data : 32000 (should be 15978)".
# A clip that silently lost its end no longer matches its transcript, so it is reported.
_DATA_SIZE = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# Streaming writers, which cannot seek back to fill in the header, leave these as the declared size.
_UNKNOWN_SIZES = {0, 0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFFF - 8}


def _info(path: Path):
    """libsndfile's view of the file's header, or None where it cannot open it (read_audio then says why)."""
    try:
        return sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError):
        return None


def _truncation(info) -> str | None:
    """Why the file of `info` looks cut short ("header says N bytes of audio, the file holds M"), or None."""
    found = None if info is None else _DATA_SIZE.search(info.extra_info)
    if found is None:
        return None
    declared, actual = int(found[1]), int(found[2])
    if declared in _UNKNOWN_SIZES or actual >= declared:
        return None
    return f"its header says {declared} bytes of audio, the file holds {actual}"


def write_example_audio_folder(root: str | Path, waves: list[np.ndarray], texts: list[str],
                               sample_rate: int = SAMPLE_RATE) -> Path:
    """Write `waves` as WAVs under ``root/clips/`` with a matching ``transcripts.jsonl``."""
    if len(waves) != len(texts):
        raise ValueError(f"got {len(waves)} waves but {len(texts)} transcripts")
    root = Path(root)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (wave, text) in enumerate(zip(waves, texts)):
        relative = f"clips/{i:05d}.wav"
        sf.write(root / relative, np.clip(np.asarray(wave, dtype=np.float32), -1, 1), sample_rate, subtype="PCM_16")
        lines.append(json.dumps({"file": relative, "text": text}))
    (root / TRANSCRIPTS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
