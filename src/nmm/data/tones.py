"""The "tones world": short melodies with exact ground truth, the audio twin of the shapes world.

A scene is 1-4 notes played with one timbre at one tempo. Each note has a pitch from a C major
scale (c4..c5) and a duration (short = one beat, long = two). Timbres are additive and exactly
band-limited (sine; square = odd harmonics at 1/k; saw = all harmonics at 1/k), so a render has
no aliasing and the rule-based judge below (`PitchJudge`) reads a clean render back exactly. Notes are separated by a short silence, so repeated pitches stay countable.

Tempos are chosen so every (tempo, duration) pair has its own note length (fast: 0.08 / 0.20 s of
sound, slow: 0.32 / 0.68 s), which lets the judge read tempo and durations from the
wave alone. A few (timbre, pitch) combinations are held out of training, like shapes' held-out
(colour, kind) pairs, to measure compositional generalisation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from nmm.modalities.audio_features import SAMPLE_RATE

PITCHES = {"c4": 261.63, "d4": 293.66, "e4": 329.63, "f4": 349.23, "g4": 392.00, "a4": 440.00,
           "b4": 493.88, "c5": 523.25}
DURATIONS = {"short": 1, "long": 2}  # beats
TEMPOS = {"slow": 0.36, "fast": 0.12}  # seconds per beat
TIMBRES = ("sine", "square", "saw")
SPLITS = ("train", "heldout_combo", "any")
DEFAULT_HELDOUT = (("sine", "b4"), ("square", "d4"), ("saw", "f4"))
GAP_S = 0.04  # silence at the end of every beat slot: separates notes, even repeated ones
PAD_S = 0.05  # silence before the first and after the last note
ATTACK_S, RELEASE_S = 0.005, 0.02  # raised-cosine ramps, so notes start and stop without clicks
AMPLITUDE = 0.5
MAX_HARMONIC_HZ = 6000.0  # band limit of square/saw: well below the 8 kHz Nyquist of 16 kHz audio


@dataclass(frozen=True)
class Note:
    pitch: str
    duration: str = "short"


@dataclass(frozen=True)
class ToneScene:
    notes: tuple[Note, ...]
    timbre: str = "sine"
    tempo: str = "slow"

    def names(self) -> list[str]:
        return [n.pitch for n in self.notes]


def note_seconds(duration: str, tempo: str) -> float:
    """How long a note sounds (its beat slot minus the gap)."""
    return DURATIONS[duration] * TEMPOS[tempo] - GAP_S


_CAPTION_RE = re.compile(rf"({'|'.join(TEMPOS)}) ({'|'.join(TIMBRES)}) : ((?:\w+ \w+ ?)+)")


class ToneWorld:
    """Samples, renders, describes and parses tone scenes. Deterministic given an rng."""

    def __init__(self, min_notes: int = 1, max_notes: int = 4, heldout=DEFAULT_HELDOUT):
        if not 1 <= min_notes <= max_notes <= 8:
            raise ValueError(f"need 1 <= min_notes <= max_notes <= 8, got {min_notes}, {max_notes}")
        for timbre, pitch in heldout:
            if timbre not in TIMBRES or pitch not in PITCHES:
                raise ValueError(f"unknown held-out combination ({timbre!r}, {pitch!r})")
        self.min_notes, self.max_notes = min_notes, max_notes
        self.heldout = frozenset(tuple(h) for h in heldout)

    # ----- sampling -----

    def sample_scene(self, rng: np.random.Generator, split: str = "train") -> ToneScene:
        """"train" avoids held-out (timbre, pitch) pairs; "heldout_combo" has at least one."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        names = list(PITCHES)
        if split == "heldout_combo":
            if not self.heldout:
                raise ValueError("split 'heldout_combo' needs at least one held-out combination")
            combos = sorted(self.heldout)
            timbre, forced = combos[rng.integers(len(combos))]
        else:
            timbre, forced = TIMBRES[rng.integers(len(TIMBRES))], None
        allowed = [p for p in names if split != "train" or (timbre, p) not in self.heldout]
        n = int(rng.integers(self.min_notes, self.max_notes + 1))
        pitches = [allowed[i] for i in rng.integers(len(allowed), size=n)]
        if forced is not None:
            pitches[rng.integers(n)] = forced
        durations = [tuple(DURATIONS)[i] for i in rng.integers(len(DURATIONS), size=n)]
        tempo = tuple(TEMPOS)[rng.integers(len(TEMPOS))]
        return ToneScene(tuple(Note(p, d) for p, d in zip(pitches, durations)), timbre, tempo)

    def scenes(self, n: int, seed: int, split: str = "train") -> list[ToneScene]:
        rng = np.random.default_rng(seed)
        return [self.sample_scene(rng, split) for _ in range(n)]

    def has_heldout(self, scene: ToneScene) -> bool:
        return any((scene.timbre, n.pitch) in self.heldout for n in scene.notes)

    def is_valid(self, scene: ToneScene) -> bool:
        return (self.min_notes <= len(scene.notes) <= self.max_notes and scene.timbre in TIMBRES
                and scene.tempo in TEMPOS
                and all(n.pitch in PITCHES and n.duration in DURATIONS for n in scene.notes))

    # ----- audio -----

    def render(self, scene: ToneScene) -> np.ndarray:
        """float32 mono at 16 kHz, peak <= AMPLITUDE."""
        if not self.is_valid(scene):
            raise ValueError(f"invalid tone scene {scene}")
        pad = np.zeros(int(PAD_S * SAMPLE_RATE), np.float32)
        parts = [pad]
        for note in scene.notes:
            parts.append(tone(PITCHES[note.pitch], note_seconds(note.duration, scene.tempo), scene.timbre))
            parts.append(np.zeros(int(GAP_S * SAMPLE_RATE), np.float32))
        parts[-1] = pad  # the last gap becomes the closing pad
        return np.concatenate(parts)

    # ----- text -----

    def caption(self, scene: ToneScene) -> str:
        """e.g. "slow square : c4 short e4 long g4 short"."""
        notes = " ".join(f"{n.pitch} {n.duration}" for n in scene.notes)
        return f"{scene.tempo} {scene.timbre} : {notes}"

    def parse_caption(self, text: str) -> ToneScene | None:
        """Inverse of `caption`. Returns None, never raises, on anything else."""
        if not isinstance(text, str):
            return None
        text = " ".join(text.lower().replace(":", " : ").split())
        m = _CAPTION_RE.fullmatch(text)
        if m is None:
            return None
        words = m.group(3).split()
        pairs = list(zip(words[::2], words[1::2]))
        if any(p not in PITCHES or d not in DURATIONS for p, d in pairs) or not pairs:
            return None
        return ToneScene(tuple(Note(p, d) for p, d in pairs), m.group(2), m.group(1))

    def all_words(self) -> list[str]:
        return sorted({":", *PITCHES, *DURATIONS, *TEMPOS, *TIMBRES})


def tone(freq: float, seconds: float, timbre: str) -> np.ndarray:
    """One enveloped note: float32, peak about AMPLITUDE."""
    if timbre not in TIMBRES:
        raise ValueError(f"unknown timbre {timbre!r}; expected one of {TIMBRES}")
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    n_harm = 1 if timbre == "sine" else int(MAX_HARMONIC_HZ // freq)
    ks = np.arange(1, n_harm + 1)
    if timbre == "square":
        ks = ks[ks % 2 == 1]
    wave = (np.sin(2 * np.pi * freq * ks[:, None] * t[None]) / ks[:, None]).sum(0)
    env = np.ones_like(t)
    a, r = int(ATTACK_S * SAMPLE_RATE), int(RELEASE_S * SAMPLE_RATE)
    env[:a] = 0.5 - 0.5 * np.cos(np.pi * np.arange(a) / a)
    env[len(env) - r:] = 0.5 + 0.5 * np.cos(np.pi * np.arange(r) / r)
    wave = wave * env
    return (AMPLITUDE * wave / np.abs(wave).max()).astype(np.float32)


# ----- the judge -----

FRAME, HOP = 480, 160  # 30 ms analysis window (two periods of 100 Hz) every 10 ms
MIN_LAG, MAX_LAG = SAMPLE_RATE // 1000, SAMPLE_RATE // 100  # pitch search range 100-1000 Hz
RUN_BIAS_S = 0.015
_NAMES = list(PITCHES)
_LOG_F = np.log2(np.array(list(PITCHES.values())))
# (tempo, duration) classes by their sounding length, for reading a wave without a scene.
_LENGTH_CLASSES = [(t, d, note_seconds(d, t)) for t in TEMPOS for d in DURATIONS]


class PitchJudge:
    """Reads note sequences out of any 16 kHz waveform and scores them against a `ToneScene`.

    Frames are voiced when loud (above `energy` of the loudest frame) and periodic (YIN
    aperiodicity below `aperiodicity`); a note is a run of voiced frames on one named pitch
    (within `tolerance_cents`), at least `min_frames` long. Noise is aperiodic, so it reads as
    no notes at all.
    """

    def __init__(self, energy: float = 0.1, aperiodicity: float = 0.2, tolerance_cents: float = 50.0,
                 min_frames: int = 4):
        self.energy, self.aperiodicity = energy, aperiodicity
        self.tolerance = tolerance_cents / 1200.0  # in octaves
        self.min_frames = min_frames

    def frames(self, wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per 10-ms frame: (f0 in Hz, 0 where unvoiced), and frame RMS. Both (n_frames,)."""
        wave = np.asarray(wave, dtype=np.float64).ravel()
        if wave.size < FRAME + MAX_LAG:
            wave = np.pad(wave, (0, FRAME + MAX_LAG - wave.size))
        n = 1 + (wave.size - FRAME - MAX_LAG) // HOP
        idx = np.arange(n)[:, None] * HOP + np.arange(FRAME + MAX_LAG)[None]
        x = wave[idx]  # (n, FRAME + MAX_LAG)
        rms = np.sqrt((x[:, :FRAME] ** 2).mean(1))
        # YIN difference d(tau) = sum (x_j - x_{j+tau})^2 over the window, then normalised by its
        # running mean so the first dip below the threshold is the period, not an octave below.
        d = np.stack([((x[:, :FRAME] - x[:, tau:tau + FRAME]) ** 2).sum(1) for tau in range(MAX_LAG + 1)], 1)
        cum = np.cumsum(d[:, 1:], 1) / np.arange(1, MAX_LAG + 1)
        dn = np.ones_like(d)
        dn[:, 1:] = d[:, 1:] / np.maximum(cum, 1e-12)
        f0 = np.zeros(n)
        for i in range(n):
            below = np.nonzero(dn[i, MIN_LAG:] < self.aperiodicity)[0]
            if below.size == 0 or rms[i] < self.energy * max(rms.max(), 1e-6):
                continue
            tau = MIN_LAG + below[0]
            while tau + 1 <= MAX_LAG and dn[i, tau + 1] < dn[i, tau]:  # walk down to the dip
                tau += 1
            if 0 < tau < MAX_LAG:  # parabolic interpolation for sub-sample lag
                a, b, c = dn[i, tau - 1], dn[i, tau], dn[i, tau + 1]
                shift = 0.5 * (a - c) / max(a - 2 * b + c, 1e-12)
                f0[i] = SAMPLE_RATE / (tau + float(np.clip(shift, -1, 1)))
            else:
                f0[i] = SAMPLE_RATE / tau
        return f0, rms

    def name(self, freq: float) -> str | None:
        """Nearest named pitch within tolerance, else None."""
        dist = np.abs(_LOG_F - np.log2(freq))
        i = int(dist.argmin())
        return _NAMES[i] if dist[i] <= self.tolerance else None

    def segments(self, wave: np.ndarray) -> list[dict]:
        """Notes found in a wave: [{"pitch", "freq", "seconds", "timbre"}] in time order."""
        wave = np.asarray(wave, dtype=np.float64).ravel()
        f0, _ = self.frames(wave)
        labels = [self.name(f) if f > 0 else None for f in f0]
        notes, start = [], 0
        for i in range(1, len(labels) + 1):
            if i == len(labels) or labels[i] != labels[start]:
                if labels[start] is not None and i - start >= self.min_frames:
                    freq = float(np.median(f0[start:i]))
                    seg = wave[start * HOP:(i - 1) * HOP + FRAME]
                    notes.append({"pitch": labels[start], "freq": freq, "seconds": (i - start) * HOP / SAMPLE_RATE,
                                  "timbre": _timbre(seg, freq)})
                start = i
        return notes

    def read(self, wave: np.ndarray) -> list[str]:
        """Predicted note names, e.g. ["c4", "e4", "g4"]."""
        return [n["pitch"] for n in self.segments(wave)]

    def read_scene(self, wave: np.ndarray) -> ToneScene | None:
        """The whole scene a wave shows (tempo and timbre by majority vote), or None if no notes."""
        segs = self.segments(wave)
        if not segs:
            return None
        # Nearest (tempo, duration) class by log length; the 30-ms window makes a run of voiced
        # frames read ~15 ms longer than the note sounds.
        lengths = [max(s["seconds"] - RUN_BIAS_S, 0.01) for s in segs]
        classes = [min(_LENGTH_CLASSES, key=lambda c: abs(np.log(c[2] / x))) for x in lengths]
        tempo = max(TEMPOS, key=lambda t: sum(c[0] == t for c in classes))
        timbre = max(TIMBRES, key=lambda t: sum(s["timbre"] == t for s in segs))
        notes = []
        for s, x in zip(segs, lengths):  # duration re-read at the voted tempo
            d = min(DURATIONS, key=lambda d: abs(np.log(note_seconds(d, tempo) / x)))
            notes.append(Note(s["pitch"], d))
        return ToneScene(tuple(notes), timbre, tempo)

    def score(self, wave: np.ndarray, target: ToneScene) -> dict:
        """Per-note accuracy (position-aligned, over the longer of target and read sequences),
        note-count match, tempo/timbre match, and exact (everything right)."""
        read = self.read_scene(wave)
        got = read.notes if read is not None else ()
        denom = max(len(got), len(target.notes))
        pitch = sum(a.pitch == b.pitch for a, b in zip(got, target.notes)) / denom
        both = sum(a == b for a, b in zip(got, target.notes)) / denom
        result = {"count": len(got) == len(target.notes), "pitch": pitch, "note": both,
                  "tempo": read is not None and read.tempo == target.tempo,
                  "timbre": read is not None and read.timbre == target.timbre}
        result["exact"] = bool(read == target)
        return result


def _timbre(seg: np.ndarray, freq: float) -> str:
    """sine / square / saw from the 2nd and 3rd harmonic levels relative to the fundamental."""
    spec = np.abs(np.fft.rfft(seg * np.hanning(len(seg))))
    bins = np.fft.rfftfreq(len(seg), 1 / SAMPLE_RATE)

    def level(k: int) -> float:
        near = np.abs(bins - k * freq) <= freq * 0.25
        return float(spec[near].max()) if near.any() else 0.0

    h1 = max(level(1), 1e-12)
    r2, r3 = level(2) / h1, level(3) / h1
    if r2 < 0.1 and r3 < 0.1:
        return "sine"
    return "saw" if r2 > 0.25 else "square"  # saw's 2nd harmonic is 1/2; square has none
