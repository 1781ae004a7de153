"""A speech world: short English utterances spoken by eSpeak NG, with exact ground truth.

eSpeak NG is a small rule-based synthesiser (no weights, no network), fast enough (a few ms per
phrase) to generate unlimited (text, waveform) pairs on the fly. Every utterance is one of a few
kinds whose text we know exactly: digit strings ("seven three one"), numbers in words ("forty
two"), single words, and short sentences (templated, or supplied by the caller, such as the
shapes world's captions). Texts use a tiny alphabet (lower-case letters and spaces) so a
character recogniser (`nmm.eval.speech_judge`) can score any waveform against them.

Voices are eSpeak voice variants crossed with speaking rates and pitches. About a fifth of the
variants are held out: they never occur in the "train" split, so "heldout" measures how well a
model (or the recogniser) generalises to speakers it never heard.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import threading
from dataclasses import dataclass

import numpy as np

from nmm.errors import NmmError
from nmm.modalities.audio_features import SAMPLE_RATE

ALPHABET = " abcdefghijklmnopqrstuvwxyz"  # every character an utterance text can contain
SPLITS = ("train", "heldout", "any")
KINDS = ("digits", "number", "word", "sentence")

# Variants from espeak-ng-data/voices/!v: the numbered male/female ones, the klatt synthesiser
# family and a handful of named ones. Novelty voices (whisper, croak, Demonic, robots) are left
# out: they are hard to understand even for people.
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
            "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6",
            "adam", "aunty", "benjamin", "david", "ed", "edward", "grandpa", "ian", "john", "linda",
            "max", "michel", "norbert", "paul", "quincy", "rob", "robert", "steph", "travis", "zac")
# Fixed rather than random so the split never changes under anyone: one in five of each family.
HELDOUT_VARIANTS = ("m4", "f3", "klatt4", "david", "linda", "norbert", "travis", "max")
LANGUAGES = ("en", "en-us")  # British and American rules: different vowels for the same text
RATES = (150, 175, 200)  # words per minute (eSpeak's default is 175)
PITCHES = (35, 50, 65)  # eSpeak's 0-100 base pitch (default 50)

_ESPEAK_RATE, _ESPEAK_PITCH = 1, 3  # espeak_PARAMETER values
_AUDIO_OUTPUT_SYNCHRONOUS = 0x02
_ESPEAK_RATE_HZ = 22_050  # the rate eSpeak NG reports from espeak_Initialize for its voices


class SpeechSynthError(NmmError, RuntimeError):
    """eSpeak NG is missing, or refused a voice or text."""


@dataclass(frozen=True)
class Voice:
    name: str  # eSpeak "language+variant", e.g. "en+m3" or "en-us+f2"
    rate: int = 175  # words per minute
    pitch: int = 50  # 0-100

    @property
    def variant(self) -> str:
        return self.name.split("+", 1)[1] if "+" in self.name else ""


# ----- the engine -----

def _find_espeak() -> tuple[str, str | None]:
    """(shared library path, data path or None for the library's default)."""
    try:
        import espeakng_loader
        return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
    except ImportError:
        pass
    system = ctypes.util.find_library("espeak-ng")
    if system is None:
        raise SpeechSynthError("eSpeak NG not found: install it with `pip install espeakng-loader` "
                               "(or `apt install espeak-ng`)")
    return system, None


class _Engine:
    """The one eSpeak NG instance of this process. eSpeak keeps its voice, parameters and output
    callback in global state, so every synthesis holds the lock from setting the voice to the
    last sample."""

    def __init__(self):
        lib_path, data_path = _find_espeak()
        try:
            self.lib = ctypes.CDLL(lib_path)
        except OSError as e:
            raise SpeechSynthError(f"could not load eSpeak NG from {lib_path}: {e}; reinstall it with "
                                   "`pip install espeakng-loader` (or `apt install espeak-ng`)") from e
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                          ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.data_path = data_path
        self.rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                               data_path.encode() if data_path else None, 0)
        if self.rate <= 0:
            raise SpeechSynthError(f"eSpeak NG failed to initialise (data path {data_path!r})")
        self._chunks: list[np.ndarray] = []
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                         ctypes.c_void_p)

        def on_audio(wav, n, events):
            if n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._callback = callback_type(on_audio)  # referenced for as long as eSpeak may call it
        self.lib.espeak_SetSynthCallback(self._callback)
        self.lock = threading.Lock()
        self._voice: Voice | None = None

    def synth(self, text: str, voice: Voice) -> np.ndarray:
        """int16 samples at `self.rate`."""
        data = text.encode() + b"\0"
        with self.lock:
            if voice != self._voice:
                if self.lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
                    self._voice = None
                    raise SpeechSynthError(f"eSpeak NG has no voice {voice.name!r}")
                self.lib.espeak_SetParameter(_ESPEAK_RATE, int(voice.rate), 0)
                self.lib.espeak_SetParameter(_ESPEAK_PITCH, int(voice.pitch), 0)
                self._voice = voice
            self._chunks = []
            status = self.lib.espeak_Synth(data, len(data), 0, 0, 0, 0, None, None)
            chunks, self._chunks = self._chunks, []
        if status != 0 or not chunks:
            raise SpeechSynthError(f"eSpeak NG could not speak {text!r} with {voice} (status {status})")
        return np.concatenate(chunks)


_ENGINE: _Engine | None = None
_ENGINE_LOCK = threading.Lock()


def engine() -> _Engine:
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None:
            _ENGINE = _Engine()
        return _ENGINE


def available_variants() -> set[str]:
    """Variant names present in the installed eSpeak data (or all of VARIANTS when the library
    uses its built-in default data path, which we cannot list)."""
    data = engine().data_path
    if data is None:
        for guess in ("/usr/lib/x86_64-linux-gnu/espeak-ng-data", "/usr/share/espeak-ng-data"):
            if os.path.isdir(guess):
                data = guess
                break
        else:
            return set(VARIANTS)
    return set(os.listdir(os.path.join(data, "voices", "!v")))


def voice_catalogue(split: str = "any") -> list[Voice]:
    """Every voice of a split, in a fixed order: variants x languages x rates x pitches."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    present = available_variants()
    missing = [v for v in VARIANTS if v not in present]
    if missing:
        raise SpeechSynthError(f"eSpeak NG data lacks the voice variants {missing}; "
                               "reinstall with `pip install -U espeakng-loader`")
    variants = [v for v in VARIANTS if split == "any" or (v in HELDOUT_VARIANTS) == (split == "heldout")]
    return [Voice(f"{lang}+{v}", rate, pitch)
            for v in variants for lang in LANGUAGES for rate in RATES for pitch in PITCHES]


def synthesize(text: str, voice: Voice = Voice("en+m3")) -> np.ndarray:
    """Speak `text`: float32 mono at 16 kHz, silence trimmed to ~50 ms each side, peak 0.9.

    Not bit-exact across calls: eSpeak carries a little synthesis state (waveform phase, pitch
    smoothing) from one utterance to the next, so two renders of the same (text, voice) differ
    by a few samples in length and in phase, never in what is said."""
    import soxr

    if not text.strip():
        raise SpeechSynthError("cannot speak an empty text")
    eng = engine()
    wave = eng.synth(text, voice).astype(np.float32) / 32768.0
    wave = soxr.resample(wave, eng.rate, SAMPLE_RATE).astype(np.float32)
    return _trim_and_normalise(wave)


def _trim_and_normalise(wave: np.ndarray, keep_s: float = 0.05, peak: float = 0.9) -> np.ndarray:
    loudest = float(np.abs(wave).max()) if wave.size else 0.0
    if loudest == 0.0:
        raise SpeechSynthError("eSpeak NG produced silence")
    # 2% of the peak is well below the quietest consonant eSpeak makes but above resampler ringing.
    loud = np.nonzero(np.abs(wave) > 0.02 * loudest)[0]
    keep = int(keep_s * SAMPLE_RATE)
    wave = wave[max(loud[0] - keep, 0):loud[-1] + keep + 1]
    return (wave * (peak / loudest)).astype(np.float32)


# ----- texts -----

ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEENS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
WORDS = ("red", "green", "blue", "yellow", "black", "white", "circle", "square", "triangle", "cross",
         "small", "large", "left", "right", "top", "bottom", "center", "yes", "no", "hello",
         "water", "music", "house", "garden", "window", "apple", "river", "table", "happy", "quick",
         "morning", "evening", "picture", "sound", "voice", "model", "number", "letter", "seven", "zebra")
_SUBJECTS = ("the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "she", "he")
_VERBS = ("sees", "likes", "wants", "finds", "draws", "paints", "moves", "holds")
_OBJECTS = ("a red circle", "the blue square", "two green triangles", "a yellow cross", "the big house",
            "some water", "a quick picture", "the window")
_ENDINGS = ("", " today", " at night", " in the garden", " on the table", " again")


def number_words(n: int) -> str:
    """0..999 in words, without "and": 342 -> "three hundred forty two"."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_words covers 0..999, got {n}")
    if n < 10:
        return ONES[n]
    if n < 20:
        return TEENS[n - 10]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def normalize_text(text: str) -> str:
    """Lower-case letters and single spaces only; digits are spelled out one by one."""
    text = text.lower()
    text = re.sub(r"\d", lambda m: f" {ONES[int(m.group())]} ", text)
    text = re.sub(r"[^a-z]+", " ", text)
    return " ".join(text.split())


class SpeechWorld:
    """Samples utterance texts and voices, and renders them. Deterministic given a seed.

    `sentences`: extra sentences (e.g. shapes-world captions) used for the "sentence" kind
    alongside the built-in templates; they are normalised with `normalize_text`.
    """

    def __init__(self, sentences: list[str] | None = None, kinds: tuple[str, ...] = KINDS,
                 weights: tuple[float, ...] | None = None, max_digits: int = 5):
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(f"unknown utterance kind {kind!r}; expected some of {KINDS}")
        if weights is not None and len(weights) != len(kinds):
            raise ValueError(f"got {len(weights)} weights for {len(kinds)} kinds")
        self.kinds = tuple(kinds)
        w = np.ones(len(kinds)) if weights is None else np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.max_digits = max_digits
        self.sentences = [s for s in (normalize_text(s) for s in sentences or []) if s]
        self._voices = {split: voice_catalogue(split) for split in SPLITS}

    def voices(self, split: str = "train") -> list[Voice]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return list(self._voices[split])

    def sample_text(self, rng: np.random.Generator, kind: str | None = None) -> str:
        kind = kind or self.kinds[rng.choice(len(self.kinds), p=self.weights)]
        if kind == "digits":
            n = int(rng.integers(1, self.max_digits + 1))
            return " ".join(ONES[d] for d in rng.integers(0, 10, size=n))
        if kind == "number":
            return number_words(int(rng.integers(0, 1000)))
        if kind == "word":
            return WORDS[rng.integers(len(WORDS))]
        if kind == "sentence":
            if self.sentences and rng.random() < 0.5:
                return self.sentences[rng.integers(len(self.sentences))]
            parts = (_SUBJECTS, _VERBS, _OBJECTS, _ENDINGS)
            return normalize_text(" ".join(p[rng.integers(len(p))] for p in parts))
        raise ValueError(f"unknown utterance kind {kind!r}; expected one of {KINDS}")

    def utterances(self, n: int, seed: int, split: str = "train") -> list[tuple[str, Voice]]:
        """n (text, voice) pairs; "train" uses train voices only, "heldout" only held-out ones."""
        voices = self.voices(split)
        rng = np.random.default_rng(seed)
        return [(self.sample_text(rng), voices[rng.integers(len(voices))]) for _ in range(n)]

    def render(self, text: str, voice: Voice) -> np.ndarray:
        return synthesize(text, voice)

    def is_heldout_voice(self, voice: Voice) -> bool:
        return voice.variant in HELDOUT_VARIANTS
