"""The command line as a user meets it: outputs, --help, and one-line errors for bad input."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def nmm(*args, timeout=300):
    """Run the CLI as a user would, with every Python warning an error: a user sees nmm's output and
    nmm's errors, never a library's warning from deep inside."""
    proc = subprocess.run([sys.executable, "-W", "error", "-m", "nmm.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]
    return proc


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("cmd", ["demo", "train", "generate", "eval", "inspect", "serve", "compare", "export", "import", "data"])
def test_help(cmd):
    proc = nmm(cmd, "--help")
    assert proc.returncode == 0 and "Usage" in proc.stdout


def test_unknown_preset_and_key(tmp_path):
    assert_one_line_error(nmm("train", "no-such-preset", "--out", tmp_path / "r"), "unknown preset", "shapes-tiny")
    assert_one_line_error(nmm("train", "shapes-tiny", "--out", tmp_path / "r", "train.bogus=1"), "train.bogus")


def test_missing_and_corrupt_run(tiny_run, tmp_path):
    assert_one_line_error(nmm("generate", tmp_path / "nope", "--prompt", "a red circle"), "no such run directory")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    garbage = b"\x00garbage" * 10
    (broken / "model.safetensors").write_bytes(garbage)
    assert_one_line_error(nmm("generate", broken, "--prompt", "a red circle", "--out", tmp_path / "x.png"),
                          "model.safetensors")
    assert (broken / "model.safetensors").read_bytes() == garbage  # nothing was overwritten
    assert not (tmp_path / "x.png").exists()


def test_generate_image_and_caption(tiny_run, tmp_path):
    out = tmp_path / "gen.png"
    proc = nmm("generate", tiny_run, "--prompt", "a small red circle at the top left", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (256, 256)
    # The PNG we wrote (8x upscaled) reads back as the model's 32x32 input; a 48x48 image is resized.
    odd = tmp_path / "odd.png"
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(odd)
    for image in (out, odd):
        proc = nmm("generate", tiny_run, "--image", image, "--prompt", "describe")
        assert proc.returncode == 0, proc.stderr
    proc = nmm("generate", tiny_run, "--image", out, "--prompt", "what colour is the circle?")
    assert proc.returncode == 0, proc.stderr


def test_bad_image_and_long_prompt(tiny_run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert_one_line_error(nmm("generate", tiny_run, "--image", bad), "bad.png")
    assert_one_line_error(nmm("generate", tiny_run, "--prompt", "red " * 400), "context")


def test_generate_speaks_and_transcribes(speech_run, tiny_run, tmp_path):
    import soundfile as sf

    out = tmp_path / "said.wav"
    proc = nmm("generate", speech_run, "--prompt", "seven three", "--out", out, "--temperature", "1")
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and sf.info(out).samplerate == 16_000
    stereo = tmp_path / "stereo.wav"  # 44.1 kHz stereo: mixed down and resampled, and said so
    t = np.arange(44_100) / 44_100
    sf.write(stereo, np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], 1) * 0.3, 44_100)
    proc = nmm("generate", speech_run, "--audio", stereo)
    assert proc.returncode == 0, proc.stderr
    assert "mixed 2 channels down to mono" in proc.stdout and "resampled 44100 -> 16000" in proc.stdout
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really")
    assert_one_line_error(nmm("generate", speech_run, "--audio", bad), "bad.wav")
    assert_one_line_error(nmm("generate", tiny_run, "--audio", stereo), "no audio modality")


def test_eval_writes_results(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    proc = nmm("eval", run, "--samples", "4", "--tasks", "shapes_captioning,shapes_qa,shapes_t2i,text_perplexity")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run / "eval" / "results.json").read_text())["metrics"]
    for key in ("m2t_exact_match", "m2g_judged_accuracy", "heldout_combo_m2t_exact_match", "text_perplexity"):
        assert 0 <= metrics[key] < float("inf")


def test_inspect_json():
    proc = nmm("inspect", "shapes-demo", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["fusion"] == "early" and info["representation"] == "discrete"
    assert info["params_total"] > 1e6 and info["flops_per_token"] > 2 * info["params_total"] * 0.5


@pytest.mark.slow
def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    proc = nmm("demo", "--quick", "--out", out, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("m2t_attribute_accuracy", "m2t_exact_match", "m2g_judged_accuracy", "heldout_combo_m2t_attribute_accuracy",
                "heldout_combo_m2t_exact_match", "heldout_combo_m2g_judged_accuracy", "train_minutes"):
        assert key in metrics
    html = (out / "report.html").read_text()
    for png in ("loss.png", "reconstructions.png", "generations_heldout.png", "captions_heldout_combo.png"):
        assert png in html and (out / png).stat().st_size > 1000
