"""A user's own recordings (nmm.data.audio_folder, `data.source=audio_folder`): bad items are
skipped with a reason that names them, the rest loads, and the source trains like `speech`."""

import json
import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from nmm.config import AudioCodecConfig, load_config
from nmm.data.audio_folder import (
    TRANSCRIPTS_FILE,
    AudioFolder,
    normalise_transcript,
    write_example_audio_folder,
)
from nmm.data.mixture import TranscriptPool, speech_roles
from nmm.data.sources import AudioFolderSource, data_source
from nmm.errors import ConfigError, InputError, NmmError
from nmm.modalities.audio import AudioCodec
from nmm.modalities.codecs import Codecs
from nmm.modalities.text import TextTokenizer


def tone(seconds: float = 0.5, hz: float = 220.0, rate: int = 16_000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    return wave if channels == 1 else np.stack([wave] * channels, axis=1)


def write_lines(root, lines: list[str]) -> None:
    (root / TRANSCRIPTS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def entry(file: str, text: str, **extra) -> str:
    return json.dumps({"file": file, "text": text, **extra})


@pytest.fixture
def messy(tmp_path):
    """A folder with 4 good clips and one of every kind of bad item, listed in this order:
    line 1 good.wav, 2 stereo.flac (44.1 kHz stereo), 3 cut.wav (truncated mid-data), 4 header.wav
    (cut inside its header), 5 garbage.wav, 6 gone.wav (missing), 7 empty transcript, 8 bad JSON,
    9 long.wav (over max_seconds), 10 no "text", 11 other.ogg, 12 speaker.wav (extra keys)."""
    sf.write(tmp_path / "good.wav", tone(), 16_000)
    sf.write(tmp_path / "stereo.flac", tone(rate=44_100, channels=2), 44_100)
    sf.write(tmp_path / "cut.wav", tone(1.0), 16_000)
    (tmp_path / "cut.wav").write_bytes((tmp_path / "cut.wav").read_bytes()[:10_000])  # header intact
    sf.write(tmp_path / "header.wav", tone(), 16_000)
    (tmp_path / "header.wav").write_bytes((tmp_path / "header.wav").read_bytes()[:20])
    (tmp_path / "garbage.wav").write_bytes(b"this is not audio at all" * 10)
    sf.write(tmp_path / "blank.wav", tone(), 16_000)
    sf.write(tmp_path / "long.wav", tone(2.5), 16_000)
    sf.write(tmp_path / "other.ogg", tone(hz=330), 16_000, format="OGG", subtype="VORBIS")
    (tmp_path / "sub").mkdir()
    sf.write(tmp_path / "sub" / "speaker.wav", tone(hz=440, rate=8_000), 8_000)
    write_lines(tmp_path, [
        entry("good.wav", "  a  low\ttone  "),
        entry("stereo.flac", "A stereo tone"),
        entry("cut.wav", "cut short"),
        entry("header.wav", "no header"),
        entry("garbage.wav", "garbage"),
        entry("gone.wav", "missing"),
        entry("blank.wav", "   "),
        '{"file": "good.wav", "text": "oops"',
        "",  # blank lines are not items
        entry("long.wav", "far too long"),
        json.dumps({"file": "good.wav"}),
        entry("other.ogg", "an ogg tone"),
        entry("sub/speaker.wav", "a high tone", speaker="alice", take=2),
    ])
    return tmp_path


def test_a_messy_folder_loads_what_it_can_and_names_the_rest(messy, caplog):
    with caplog.at_level(logging.WARNING, logger="nmm.data.audio_folder"):
        folder = AudioFolder(messy, max_seconds=2.0)
    assert len(folder) == 4 and folder.listed == 12
    assert folder.transcripts() == ["a low tone", "A stereo tone", "an ogg tone", "a high tone"]
    assert [p.name for p in folder.paths] == ["good.wav", "stereo.flac", "other.ogg", "speaker.wav"]
    assert folder.extras == [{}, {}, {}, {"speaker": "alice", "take": 2}]

    skipped = {(s.reason, s.name) for s in folder.skipped}
    assert skipped == {("truncated", "cut.wav"), ("unreadable", "header.wav"), ("unreadable", "garbage.wav"),
                       ("missing file", "gone.wav"), ("empty transcript", "line 7"), ("bad JSON", "line 8"),
                       ("too long", "long.wav"), ("bad field", "line 11")}
    messages = {s.name: s.message for s in folder.skipped}
    assert messages["cut.wav"].startswith("transcripts.jsonl:3: cut.wav: truncated (its header says 32000 bytes")
    assert "transcripts.jsonl:5:" in messages["garbage.wav"] and "garbage.wav" in messages["garbage.wav"]
    assert "gone.wav" in messages["gone.wav"] and "transcripts.jsonl:6:" in messages["gone.wav"]
    assert messages["line 7"] == 'transcripts.jsonl:7: blank.wav: empty "text" (transcript)'
    assert messages["line 8"].startswith("transcripts.jsonl:8: invalid JSON")
    assert "2.50 s is longer than audio.max_seconds=2" in messages["long.wav"]
    assert messages["line 11"] == 'transcripts.jsonl:11: good.wav: "text" field is missing'

    assert folder.summary == (
        "loaded 4 of 12 items; skipped 8: 1 bad JSON (line 8), 1 bad field (line 11), "
        "1 empty transcript (line 7), 1 missing file (gone.wav), 2 unreadable (header.wav, garbage.wav), "
        "1 truncated (cut.wav), 1 too long (long.wav); "
        "notes: 1 mixed 2 channels down to mono, 1 resampled 44100 -> 16000 Hz, 1 resampled 8000 -> 16000 Hz")
    assert folder.notes == {"mixed 2 channels down to mono": 1, "resampled 44100 -> 16000 Hz": 1,
                            "resampled 8000 -> 16000 Hz": 1}
    assert folder.summary in caplog.text and "gone.wav" in caplog.text  # the user sees it without asking

    for i in range(len(folder)):
        wave, _ = folder[i]
        assert wave.dtype == np.float32 and wave.ndim == 1
        assert abs(len(wave) - 8000) <= 2  # every clip is 0.5 s, now at 16 kHz
        assert 0.15 < np.abs(wave).max() < 0.4  # the tone survived the mixdown and resampling


def test_a_clean_folder_reports_no_skips(tmp_path):
    write_example_audio_folder(tmp_path, [tone(hz=200 + 50 * i) for i in range(3)], ["one", "two", "three"])
    folder = AudioFolder(tmp_path)
    assert folder.summary == "loaded 3 of 3 items" and not folder.skipped and not folder.notes
    assert folder.seconds() == pytest.approx(1.5)
    np.testing.assert_allclose(folder[1][0], tone(hz=250), atol=1e-4)  # 16-bit PCM round trip
    folder[1][0][:] = 0
    assert folder[1][0].any()  # items are copies


def test_nothing_loading_is_an_error_naming_the_folder_and_every_reason(tmp_path):
    (tmp_path / "garbage.wav").write_bytes(b"RIFF nonsense")
    sf.write(tmp_path / "quiet.wav", tone(), 16_000)
    write_lines(tmp_path, [entry("garbage.wav", "x"), entry("gone.flac", "y"), entry("quiet.wav", ""), "not json"])
    with pytest.raises(InputError) as err:
        AudioFolder(tmp_path)
    message = str(err.value)
    assert isinstance(err.value, NmmError)
    assert f"no usable recordings in audio folder {tmp_path}" in message
    assert "loaded 0 of 4 items; skipped 4" in message
    for name in ("garbage.wav", "gone.flac", "transcripts.jsonl:3", "transcripts.jsonl:4: invalid JSON"):
        assert name in message


@pytest.mark.parametrize("write, match", [
    (None, "audio folder not found"),
    ("", r"transcripts\.jsonl lists no recordings"),
    (False, r"transcripts file not found: .*transcripts\.jsonl"),
])
def test_a_folder_that_cannot_be_used_at_all(tmp_path, write, match):
    root = tmp_path / "rec"
    if write is not None:
        root.mkdir()
        if write is not False:
            (root / TRANSCRIPTS_FILE).write_text(write)
    with pytest.raises(InputError, match=match):
        AudioFolder(root)


def test_a_too_short_clip_is_skipped_not_a_crash_in_the_codec(tmp_path):
    sf.write(tmp_path / "click.wav", tone(0.01), 16_000)  # 160 samples: less than the STFT needs
    sf.write(tmp_path / "ok.wav", tone(), 16_000)
    write_lines(tmp_path, [entry("click.wav", "click"), entry("ok.wav", "ok")])
    folder = AudioFolder(tmp_path)
    assert len(folder) == 1 and folder.skipped[0].reason == "too short" and "click.wav" in folder.skipped[0].message


def test_transcripts_are_kept_as_written_up_to_whitespace_and_unicode_form():
    assert normalise_transcript("  Hello,\n  World!\t") == "Hello, World!"
    assert normalise_transcript("cafe\u0301") == "caf\u00e9"  # NFC: one code point, however it was typed


def test_split_is_deterministic_disjoint_and_complete(tmp_path):
    write_example_audio_folder(tmp_path, [tone(0.1) for _ in range(20)], [f"clip {i}" for i in range(20)])
    folder = AudioFolder(tmp_path)
    train, heldout = folder.split(heldout_fraction=0.1, seed=0)
    assert len(heldout) == 2 and not set(train) & set(heldout)
    assert sorted(train + heldout) == list(range(20))
    assert folder.split(heldout_fraction=0.1, seed=0) == (train, heldout)
    assert folder.split(heldout_fraction=0.1, seed=1) != (train, heldout)
    assert AudioFolder(tmp_path).split(heldout_fraction=0.1, seed=0) == (train, heldout)  # across loads too


def test_the_source_needs_a_folder():
    with pytest.raises(ConfigError, match="data.audio_folder=PATH"):
        data_source(load_config("speech-tiny", ["data.source=audio_folder"]))


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    texts = [f"tone number {i}" for i in range(10)]
    return write_example_audio_folder(tmp_path_factory.mktemp("rec"),
                                      [tone(0.2 + 0.05 * i, hz=150 + 40 * i) for i in range(10)], texts), texts


def test_the_source_splits_the_folder_between_codec_training_and_evaluation(recordings):
    root, texts = recordings
    cfg = load_config("speech-tiny", ["data.source=audio_folder", f"data.audio_folder={root}", "data.seed=4"])
    source = data_source(cfg)
    assert isinstance(source, AudioFolderSource)
    assert source.modalities == ("audio",) and source.world is None and source.judge is None
    assert source.image_pool is None
    assert source.texts() == texts and source.summary == "loaded 10 of 10 items"
    assert len(source.train) == 9 and len(source.heldout) == 1
    waves, heldout = source.waves(), source.heldout_waves()
    assert len(waves) == 9 and len(heldout) == 1
    train_lengths = {len(w) for w in waves}
    assert len(heldout[0]) not in train_lengths  # every clip has its own length: the held-out one is not trained on


def test_roles_draw_both_documents_from_the_pre_tokenised_training_clips(recordings):
    root, texts = recordings
    cfg = load_config("speech-tiny", ["data.source=audio_folder", f"data.audio_folder={root}",
                                      "data.caption_dropout=0.5"])
    source = data_source(cfg)
    torch.manual_seed(0)
    codecs = Codecs(TextTokenizer.train(texts * 5, vocab_size=300),
                    AudioCodec(AudioCodecConfig(channels=16, depth=1)).eval())
    roles = source.roles(codecs, cfg.data)
    assert set(roles) == {"transcription", "synthesis"}
    pool = source.speech_pool
    assert sorted(pool.texts) == sorted(texts[i] for i in source.train)

    rng = np.random.default_rng(0)
    docs = [roles["transcription"](rng) for _ in range(20)]
    for doc in docs:
        audio, text = doc.segments
        assert doc.role == "transcription" and audio.modality == "audio" and not audio.loss
        assert text.text in pool.texts and len(audio.codes) > 0
    synthesis = [roles["synthesis"](rng) for _ in range(40)]
    assert all(d.role == "synthesis" and d.segments[-1].modality == "audio" for d in synthesis)
    unconditional = sum(len(d.segments) == 1 for d in synthesis)
    assert 5 < unconditional < 35  # text dropped at caption_dropout=0.5, for classifier-free guidance
    ids, targets = codecs.encode_document(docs[0])
    prefix = len(docs[0].segments[0].codes) + 3  # <bos> <audio> codes </audio>: conditioning, no loss
    assert targets == [False] * prefix + [True] * (len(ids) - prefix)  # the transcript (and <eos>) is learnt


def test_speech_roles_need_a_clip():
    with pytest.raises(ValueError, match="at least one"):
        speech_roles(TranscriptPool([], []), 0.1)


def test_nmm_train_on_a_folder_of_recordings(tmp_path):
    """End to end through the CLI: `nmm train speech-tiny data.source=audio_folder data.audio_folder=DIR`
    (about 10 s: a 20-step codec and 4 language-model steps)."""
    from typer.testing import CliRunner

    from nmm.cli import app

    texts = ["one", "two", "three", "four", "five", "six"]
    root = write_example_audio_folder(tmp_path / "rec", [tone(0.4, hz=150 + 60 * i) for i in range(6)], texts)
    sf.write(root / "clips" / "stereo.wav", tone(0.4, rate=44_100, channels=2), 44_100)
    with open(root / TRANSCRIPTS_FILE, "a") as f:
        f.write(entry("clips/stereo.wav", "seven") + "\n" + entry("clips/gone.wav", "eight") + "\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "speech-tiny", "--out", str(out), "data.source=audio_folder",
                                      f"data.audio_folder={root}"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "trained 4 steps" in result.output
    assert (out / "audio_codec.json").exists() and (out / "config.yaml").exists()
