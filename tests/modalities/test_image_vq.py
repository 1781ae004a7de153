"""The general image tokenizer (`nmm.modalities.image_vq`): code shapes and types, the EMA codebook's
dead-code restarts, learning on real photos, exact save/load, loading by codec kind through `Codecs`,
a tiny `nmm train` on a folder of 64 px pictures, and `nmm bench tokenizer --quick`.

Real pictures: crops of scikit-learn's two bundled sample photos (no download)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from nmm.config import ImageVQConfig, load_config
from nmm.errors import CheckpointError, ConfigError
from nmm.modalities.base import CODEC_PLUGINS, codec_class
from nmm.modalities.image_vq import (
    EMAQuantizer,
    ImageVQTokenizer,
    code_stats,
    evaluate_image_vq,
    recon_grid,
    train_image_vq,
)

TINY = {"channels": 16, "max_channels": 32, "disc_channels": 8, "disc_layers": 2, "batch_size": 8, "warmup_steps": 2}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small convs run several times faster on one thread than on two cores shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos64() -> np.ndarray:
    """32 crops of 64 px from the sample photos (half of them 128 px crops shrunk to 64)."""
    from nmm.bench.tokenizer import crop_drawer, sample_photos

    return crop_drawer(sample_photos(), 64)(np.random.default_rng(0), 32)


@pytest.fixture(scope="module")
def trained(photos64):
    model, stats = train_image_vq(photos64, ImageVQConfig(image_size=64, steps=40, adv_start=0.5, dead_after=10, **TINY),
                                  eval_images=photos64)
    return model, stats


def tokenizer(**kw) -> ImageVQTokenizer:
    torch.manual_seed(0)
    return ImageVQTokenizer(ImageVQConfig(**{"image_size": 64, **TINY, **kw})).eval()


@pytest.mark.parametrize("kw, tokens, codes", [({"downsample": 8}, 64, 1024), ({"downsample": 16}, 16, 1024),
                                               ({"quantizer": "fsq", "fsq_levels": [8, 5, 5, 5]}, 64, 1000)])
def test_code_shapes_and_round_trip_types(photos64, kw, tokens, codes):
    tok = tokenizer(**kw)
    ids = tok.encode(photos64[:3])
    assert ids.dtype == torch.long and ids.shape == (3, tokens)
    assert 0 <= int(ids.min()) and int(ids.max()) < codes == tok.codebook_size
    out = tok.decode(ids)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (3, 64, 64, 3)
    spec = tok.spec
    assert (spec.name, spec.codes, spec.tokens_per_item, spec.mime) == ("image", codes, tokens, "image/png")
    assert spec.grid == (int(tokens**0.5),) * 2
    assert spec.levels == ((tuple(kw["fsq_levels"]),) if "fsq_levels" in kw else ())
    assert tok.encode(photos64[:0]).shape == (0, tokens)
    with pytest.raises(ValueError, match="shape"):
        tok.encode(photos64[:, :32])
    with pytest.raises(ValueError, match="uint8"):
        tok.encode(photos64.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[0, "):
        tok.decode(torch.full((1, tokens), codes))


def test_png_bytes_round_trip_and_resize(photos64):
    tok = tokenizer()
    data = tok.to_bytes(photos64[0])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(tok.from_bytes(data), photos64[0])
    buf = io.BytesIO()
    Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(buf, format="JPEG")
    assert tok.from_bytes(buf.getvalue()).shape == (64, 64, 3)  # squashed, as the folder source does
    with pytest.raises(ValueError, match="not a readable image"):
        tok.from_bytes(b"nope")


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    z = torch.randn(4, 2, 8, 8)  # 256 vectors around the origin
    q = EMAQuantizer(n_codes=16, dim=2, decay=0.9, dead_after=3).train()
    with torch.no_grad():  # codes 0-7 on the data, 8-15 far away: nothing ever picks them
        q.embed[:8] = torch.randn(8, 2)
        q.embed[8:] = 100.0
        q.ema_sum.copy_(q.embed)
        q.initialised.fill_(True)
    far = lambda: q.embed[8:].abs().min() > 50
    for _ in range(2):
        _, ids, _ = q(z)
        assert int(ids.max()) < 8 and far() and int(q.restarts) == 0
    q(z)  # third step: codes 8-15 have gone unused for dead_after steps and restart at encoder outputs
    assert int(q.restarts) == 8 and not far()
    _, ids, _ = q(z)
    revived = set(ids.unique().tolist()) & set(range(8, 16))
    assert len(revived) == 8  # every restarted code now wins vectors
    before = q.embed.clone()
    q.eval()(z)  # eval mode never touches the codebook
    assert torch.equal(before, q.embed)


def test_without_restarts_dead_codes_stay_dead():
    torch.manual_seed(0)
    z = torch.randn(4, 2, 8, 8)
    q = EMAQuantizer(n_codes=16, dim=2, dead_after=10_000).train()
    with torch.no_grad():
        q.embed[:8], q.embed[8:] = torch.randn(8, 2), 100.0
        q.ema_sum.copy_(q.embed)
        q.initialised.fill_(True)
    for _ in range(5):
        _, ids, _ = q(z)
    assert int(ids.max()) < 8 and int(q.restarts) == 0


def test_psnr_improves_over_a_few_dozen_steps(photos64, trained):
    _, stats = trained
    untrained = evaluate_image_vq(tokenizer(), photos64)
    assert stats["steps"] == 40 and stats["final_loss"] < stats["initial_loss"]
    assert stats["psnr_db"] > untrained["psnr_db"] + 3, (untrained, stats)
    assert stats["adversarial_from_step"] == 20 and stats["final_d_loss"] is not None  # D joins after the warm-up
    assert 0 < stats["codebook_usage"] <= 1 and 1 <= stats["perplexity"] <= 1024
    assert stats["restarted_codes"] > 0


def test_save_load_reproduces_codes_exactly(tmp_path, photos64, trained):
    model, _ = trained
    model.save(tmp_path)
    loaded = ImageVQTokenizer.load(tmp_path)
    codes = model.encode(photos64)
    assert torch.equal(loaded.encode(photos64), codes)
    assert np.array_equal(loaded.decode(codes), model.decode(codes))
    assert loaded.config == model.config
    (tmp_path / "image_vq.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="image_vq.safetensors"):
        ImageVQTokenizer.load(tmp_path)
    with pytest.raises(CheckpointError, match="image_vq.json"):
        ImageVQTokenizer.load(tmp_path / "missing")


def test_codec_kind_loads_through_codecs(tmp_path, photos64, trained):
    from nmm.modalities.codecs import Codecs
    from nmm.modalities.text import TextTokenizer

    model, _ = trained
    codecs = Codecs(TextTokenizer.train(["a photo of a flower", "a photo of a temple"] * 20, vocab_size=280), model)
    codecs.save(tmp_path)
    assert json.loads((tmp_path / "codecs.json").read_text()) == {"image": "image_vq"}
    assert CODEC_PLUGINS["image_vq"] == "nmm.modalities.image_vq" and codec_class("image_vq") is ImageVQTokenizer
    loaded = Codecs.load(tmp_path)
    assert isinstance(loaded.image, ImageVQTokenizer) and loaded.vocab == codecs.vocab
    assert np.array_equal(loaded.encode_images(photos64[:4]), codecs.encode_images(photos64[:4]))


def test_code_stats_and_grid():
    assert code_stats(torch.arange(8), 16) == {"codebook_usage": 0.5, "perplexity": pytest.approx(8.0)}
    assert code_stats(torch.zeros(10, dtype=torch.long), 4)["perplexity"] == pytest.approx(1.0)
    a, b = np.zeros((3, 8, 8, 3), np.uint8), np.full((3, 8, 8, 3), 7, np.uint8)
    grid = recon_grid(a, b, cols=2, gap=1)  # 2 row pairs of 2 columns
    assert grid.shape == (4 * 9 + 1, 2 * 9 + 1, 3)
    assert (grid[1:9, 1:9] == 0).all() and (grid[10:18, 1:9] == 7).all()  # original above its reconstruction


def test_run_config_checks():
    ok = load_config("shapes-tiny", ["image_vq.enabled=true", "image.image_size=64"])
    assert ok.image_vq.enabled and ok.image_vq.image_size is None
    for bad in (["image_vq.downsample=6"], ["image_vq.quantizer=lfq"], ["image_vq.patch=16"],
                ["image_vq.image_size=60"]):
        with pytest.raises(ConfigError, match="image_vq"):
            load_config("shapes-tiny", bad)
    from nmm.modalities.image_vq import train_for_run

    for overrides, match in ((["image_vq.image_size=128", "image.image_size=64"], "image.image_size=128"),
                             (["image.image_size=64", "model.image_repr=continuous"], "quantizer=fsq"),
                             (["image.image_size=60"], "not divisible")):
        with pytest.raises(ConfigError, match=match):
            train_for_run(load_config("shapes-tiny", ["image_vq.enabled=true", *overrides]), source=None)


def test_tiny_nmm_train_on_a_64px_folder(tmp_path, photos64):
    import nmm
    from nmm.data.folder import write_example_folder
    from nmm.train.trainer import train

    captions = [f"a photo of {'a temple' if i % 2 else 'a flower'} number {i}" for i in range(len(photos64))]
    folder = write_example_folder(tmp_path / "pics", list(photos64), captions)
    cfg = load_config("shapes-tiny", ["data.source=folder", f"data.folder={folder}", "image.image_size=64",
                                      "image_vq.enabled=true", "image_vq.steps=3", "image_vq.channels=8",
                                      "image_vq.max_channels=16", "image_vq.batch_size=4", "image_vq.eval_images=4",
                                      "image_vq.disc_channels=8", "train.max_steps=3"])
    run = tmp_path / "run"
    summary = train(cfg, run, show_progress=False, log=lambda *a: None)
    assert summary["steps"] == 3 and (run / "model.safetensors").exists()
    assert json.loads((run / "codecs.json").read_text()) == {"image": "image_vq"}
    stats = json.loads((run / "tokenizer_stats.json").read_text())["image"]
    assert stats["steps"] == 3 and stats["tokens_per_image"] == 64 and stats["eval_split"] == "heldout"
    pipe = nmm.load(run)
    assert isinstance(pipe.codecs.image, ImageVQTokenizer) and pipe.codecs.vocab.tokens_per_image == 64
    assert isinstance(pipe.caption(photos64[:1], max_new_tokens=4)[0], str)
    images = pipe.generate_images([captions[0]], cfg_scale=1.0)
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8


def test_bench_tokenizer_quick(tmp_path):
    from typer.testing import CliRunner

    from nmm.bench.tokenizer import fashion_unavailable
    from nmm.cli import app

    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, ["bench", "tokenizer", "--quick", "--out", str(out), "--grids",
                                          str(tmp_path / "grids")])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    got = json.loads(out.read_text())["tokenizer"]
    expect = {"photos"} | (set() if fashion_unavailable() else {"fashion"})
    assert set(got["datasets"]) == expect and set(got["skipped"]) == {"photos", "fashion"} - expect
    for r in got["datasets"].values():
        assert r["psnr_db"] > 0 and 0 < r["codebook_usage"] <= 1 and r["steps"] >= 1
        grid = np.asarray(Image.open(r["grid_png"]))
        assert grid.shape[1] > 64 * 8 and grid.shape[0] > 64 * 2
