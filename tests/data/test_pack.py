"""`nmm data pack`: the shapes world and folders into WebDataset shards, with curation and a report.

An image folder with planted problems (an exact copy, a re-encoded and a resized copy, a corrupt
file, a missing one, an over-long and a too-short caption, a thumbnail, a broken line) must come
out with exactly those dropped, for exactly those reasons, and the rest in the shards."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nmm.config import RunConfig
from nmm.data.audio_folder import write_example_audio_folder
from nmm.data.curation import NearDuplicates, hamming, perceptual_hash
from nmm.data.pack import pack
from nmm.data.shards import Decoder, read_shard
from nmm.data.video_folder import write_example_video_folder
from nmm.errors import InputError

DISTINCT = 8


def smooth_image(seed: int, size: int = 64) -> Image.Image:
    """A photo-like image: a random 4x4 colour field, smoothly upsampled (far apart in pHash)."""
    small = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def encoded(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def read_back(out) -> list[dict]:
    return [s for shard in sorted(out.glob("shard-*.tar")) for s in read_shard(str(shard))]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """An image folder: DISTINCT good images, then one of each problem. -> (folder, {key: reason})."""
    root = tmp_path_factory.mktemp("pictures")
    (root / "images").mkdir()
    (root / "copies").mkdir()
    lines, expected = [], {}
    for i in range(DISTINCT):
        (root / f"images/{i:02d}.png").write_bytes(encoded(smooth_image(i)))
        lines.append({"image": f"images/{i:02d}.png", "caption": f"photo number {i} of a quiet place"})

    def plant(name: str, data: bytes | None, caption: str, reason: str):
        if data is not None:
            (root / name).write_bytes(data)
        lines.append({"image": name, "caption": caption})
        expected[name] = reason

    plant("copies/same.png", (root / "images/00.png").read_bytes(), "the same file again", "exact_duplicate")
    plant("copies/recompressed.jpg", encoded(smooth_image(1), "JPEG", quality=90), "re-encoded", "near_duplicate")
    plant("copies/smaller.png", encoded(smooth_image(2).resize((48, 48), Image.Resampling.LANCZOS)), "resized",
          "near_duplicate")
    plant("broken.png", encoded(smooth_image(50))[:200], "a file cut short", "unreadable")
    plant("nowhere.png", None, "a file that is not there", "missing_file")
    plant("long.png", encoded(smooth_image(51)), "word " * 120, "caption_too_long")
    plant("short.png", encoded(smooth_image(52)), "ab", "caption_too_short")
    plant("thumb.png", encoded(smooth_image(53, size=8)), "a tiny thumbnail", "too_small")
    text = "\n".join(json.dumps(line) for line in lines) + "\n{not json\n" + json.dumps({"caption": "no image"}) + "\n"
    (root / "captions.jsonl").write_text(text)
    n = len(lines)
    expected[f"line {n + 1}"] = expected[f"line {n + 2}"] = "bad_record"
    return root, expected


def test_the_perceptual_hash_tells_copies_from_different_pictures():
    hashes = [perceptual_hash(smooth_image(i)) for i in range(DISTINCT)]
    assert min(hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]) > 6
    assert hamming(hashes[1], perceptual_hash(Image.open(io.BytesIO(encoded(smooth_image(1), "JPEG", quality=90))))) <= 6
    index = NearDuplicates(6)
    index.add(hashes[0], "a")
    assert index.find(hashes[0] ^ 0b101) == ("a", 2)  # two bits off: found through an unchanged band
    assert index.find(hashes[0] ^ 0b1111111) is None  # seven bits off: over the distance


def test_pack_an_image_folder_drops_exactly_the_planted_problems(planted, tmp_path):
    root, expected = planted
    report = pack(root, tmp_path / "out", shard_size=3, show_progress=False)
    assert report["kind"] == "image"
    assert (report["seen"], report["kept"]) == (DISTINCT + len(expected), DISTINCT)
    by_reason = {r: sorted(e["key"] for e in v["examples"]) for r, v in report["dropped_by_reason"].items()}
    want: dict[str, list[str]] = {}
    for key, reason in expected.items():
        want.setdefault(reason, []).append(key)
    assert by_reason == {r: sorted(keys) for r, keys in want.items()}
    assert {r: v["count"] for r, v in report["dropped_by_reason"].items()} == {r: len(k) for r, k in want.items()}
    details = {e["key"]: e["detail"] for v in report["dropped_by_reason"].values() for e in v["examples"]}
    assert "images/00.png" in details["copies/same.png"]
    assert "images/01.png" in details["copies/recompressed.jpg"] and "images/02.png" in details["copies/smaller.png"]
    assert "captions.jsonl:" in details[f"line {DISTINCT + len(expected) - 1}"]

    # The shards: DISTINCT samples in shards of 3, raw PNG bytes + caption + the source file.
    assert [s["samples"] for s in report["shards"]] == [3, 3, 2]
    samples = read_back(tmp_path / "out")
    assert sorted(json.loads(s["json"])["source"] for s in samples) == [f"images/{i:02d}.png" for i in range(DISTINCT)]
    for s in samples:
        i = int(json.loads(s["json"])["source"][7:9])
        assert s["png"] == (root / f"images/{i:02d}.png").read_bytes()
        assert s["txt"].decode() == f"photo number {i} of a quiet place"
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    assert report["pattern"].endswith("shard-{000000..000002}.tar")


def test_pack_shapes_reports_duplicate_scenes_and_fills_shards(tmp_path):
    report = pack("shapes", tmp_path / "out", count=150, shard_size=40, show_progress=False)
    dropped = report["dropped_by_reason"]
    assert set(dropped) <= {"exact_duplicate"} and report["kept"] + report["dropped"] == 150
    assert sum(s["samples"] for s in report["shards"]) == report["kept"]
    assert all(s["samples"] == 40 for s in report["shards"][:-1])
    samples = read_back(tmp_path / "out")
    assert len({s["png"] for s in samples}) == len(samples) == report["kept"]  # no two alike
    kept = {json.loads(s["json"])["source"] for s in samples}
    for example in dropped.get("exact_duplicate", {"examples": []})["examples"]:
        assert example["key"] not in kept and example["detail"].split()[-1] in kept
    image = Decoder(RunConfig())({"png": samples[0]["png"], "txt": samples[0]["txt"]})[0].value
    assert image.shape == (32, 32, 3) and image.max() > 0


def test_pack_audio_and_video_folders(tmp_path):
    t = np.arange(8000) / 16000
    waves = [0.3 * np.sin(2 * np.pi * f * t) for f in (220, 330, 440)] + [0.3 * np.sin(2 * np.pi * 550 * np.arange(48000) / 16000)]
    audio = write_example_audio_folder(tmp_path / "speech", waves, ["one", "two", "three", "a long take"])
    with (audio / "transcripts.jsonl").open("a") as f:
        f.write(json.dumps({"file": "clips/00000.wav", "text": "one again"}) + "\n")
    report = pack(audio, tmp_path / "audio-shards", shard_size=10, options=None, show_progress=False)
    assert report["kind"] == "audio" and report["kept"] == 4
    assert report["dropped_by_reason"]["exact_duplicate"]["examples"][0]["key"] == "clips/00000.wav"

    from nmm.data.curation import CurationOptions

    limited = pack(audio, tmp_path / "audio-limited", options=CurationOptions(max_seconds=2.0), show_progress=False)
    assert [e["key"] for e in limited["dropped_by_reason"]["too_long"]["examples"]] == ["clips/00003.wav"]
    assert {k for s in read_back(tmp_path / "audio-shards") for k in s} >= {"wav", "txt"}

    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8) for _ in range(2)]
    video = write_example_video_folder(tmp_path / "videos", clips, ["a clip", "another clip"])
    report = pack(video, tmp_path / "video-shards", show_progress=False)
    assert report["kind"] == "video" and report["kept"] == 2
    samples = read_back(tmp_path / "video-shards")
    clip = Decoder(RunConfig())({"gif": samples[0]["gif"], "txt": samples[0]["txt"]})[0].value
    assert clip.shape == (8, 32, 32, 3)  # video.frames at video.fps, as the folder source samples them


def test_bad_input_is_an_error_naming_the_problem(tmp_path, planted):
    with pytest.raises(InputError, match="no-such-folder: no such folder"):
        pack(tmp_path / "no-such-folder", tmp_path / "o1", show_progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="captions.jsonl.*transcripts.jsonl"):
        pack(tmp_path / "empty", tmp_path / "o2", show_progress=False)
    with pytest.raises(InputError, match="--shard-size"):
        pack("shapes", tmp_path / "o3", shard_size=0, show_progress=False)
    pack("shapes", tmp_path / "o4", count=5, show_progress=False)
    with pytest.raises(InputError, match="already holds shards"):
        pack("shapes", tmp_path / "o4", count=5, show_progress=False)
    from nmm.data.curation import CurationOptions

    root, expected = planted
    with pytest.raises(InputError, match=f"kept nothing of {DISTINCT + len(expected)} items"):  # no caption fits
        pack(root, tmp_path / "o5", options=CurationOptions(max_caption_chars=2), show_progress=False)
    assert json.loads((tmp_path / "o5" / "report.json").read_text())["kept"] == 0


def test_cli_packs_and_prints_a_summary(tmp_path, capsys):
    proc = subprocess.run([sys.executable, "-W", "error", "-m", "nmm.cli", "data", "pack", "shapes", str(tmp_path / "out"),
                           "--count", "30", "--shard-size", "10", "--no-progress"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "kept" in proc.stdout and "train with: data.source=shards" in proc.stdout
    assert "Warning" not in proc.stderr  # no library warning reaches the user (-W error)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["seen"] == 30 and report["pattern"] in proc.stdout.replace("\n", "")

    from nmm.cli import main

    assert main(["data", "pack", str(tmp_path / "nowhere"), str(tmp_path / "out2")]) == 2  # one line, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "nowhere: no such folder" in err[0]
