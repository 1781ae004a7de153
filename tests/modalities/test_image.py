"""Tests for the FSQ image tokenizer (nmm.modalities.image)."""

from dataclasses import asdict

import numpy as np
import pytest
import torch

from nmm.data.shapes import COLOURS, Scene, Shape, ShapesWorld
from nmm.errors import CheckpointError, ConfigError
from nmm.eval.judge import ShapesJudge
from nmm.modalities.image import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ImageTokenizer,
    ImageTokenizerConfig,
    train_image_tokenizer,
)

SMALL = {"channels": 16, "batch_size": 32, "pool_size": 2000, "eval_images": 50}


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(image_size=32)


@pytest.fixture(scope="module")
def images(world):
    return np.stack([world.render(s) for s in world.scenes(6, seed=1, split="any")])  # (6, 32, 32, 3)


@pytest.fixture(params=[True, False], ids=["factorised", "plain"])
def model(request):
    torch.manual_seed(0)
    return ImageTokenizer(ImageTokenizerConfig(factorised=request.param, **SMALL)).eval()


def test_encode_decode_shapes_and_dtypes(model, images):
    codes = model.encode(images)
    assert model.tokens_per_image == 64
    assert codes.shape == (6, 64) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < model.codebook_size
    assert torch.equal(model.encode(torch.from_numpy(images)), codes)  # tensors work like arrays
    recon = model.decode(codes)
    assert recon.shape == (6, 32, 32, 3) and recon.dtype == np.uint8
    out, fwd_codes = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    assert out.shape == (6, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    assert torch.equal(fwd_codes, codes)


def test_code_factors(model):
    if model.config.factorised:
        assert model.code_factors == (200, 16) and model.codebook_size == 3200
    else:
        assert model.code_factors == (1000,) and model.codebook_size == 1000


def test_split_join_round_trip(model, images):
    codes = model.encode(images)
    factors = model.split_codes(codes)
    assert len(factors) == len(model.code_factors)
    for f, n in zip(factors, model.code_factors):
        assert f.min() >= 0 and f.max() < n
    assert torch.equal(model.join_codes(*factors), codes)
    every = torch.arange(model.codebook_size)
    assert torch.equal(model.join_codes(*model.split_codes(every)), every)


def test_factorised_ids_decompose(world):
    m = ImageTokenizer(ImageTokenizerConfig(**SMALL)).eval()
    n_colour = m.code_factors[1]
    shape_codes, colour_codes = m.split_codes(m.encode(np.zeros((1, 32, 32, 3), np.uint8)))
    assert torch.equal(shape_codes * n_colour + colour_codes, m.encode(np.zeros((1, 32, 32, 3), np.uint8)))
    # By construction (not by training) the shape code ignores colour...
    recoloured = [world.render(Scene((Shape("triangle", c, "large", 4),))) for c in COLOURS]
    shape_codes, _ = m.split_codes(m.encode(np.stack(recoloured)))
    assert (shape_codes == shape_codes[0]).all()
    # ...and the colour code ignores the outline wherever a patch holds one shape.
    reshaped = np.stack([world.render(Scene((Shape(k, "blue", "large", 4),))) for k in ("circle", "cross")])
    _, colour_codes = m.split_codes(m.encode(reshaped))
    lit = torch.from_numpy(reshaped.max(-1) > 64).view(2, 8, 4, 8, 4).any(4).any(2).flatten(1)  # (2, 64)
    both = lit[0] & lit[1]
    assert both.sum() > 4 and torch.equal(colour_codes[0][both], colour_codes[1][both])


def test_save_load_round_trip(model, images, tmp_path):
    model.save(tmp_path / "tok")
    assert {p.name for p in (tmp_path / "tok").iterdir()} == {WEIGHTS_FILE, CONFIG_FILE}
    loaded = ImageTokenizer.load(tmp_path / "tok")
    assert asdict(loaded.config) == asdict(model.config)
    assert torch.equal(loaded.encode(images), model.encode(images))
    assert np.array_equal(loaded.decode(model.encode(images)), model.decode(model.encode(images)))


def test_missing_or_corrupt_checkpoint(model, tmp_path):
    with pytest.raises(CheckpointError, match=CONFIG_FILE):
        ImageTokenizer.load(tmp_path / "nothing")
    model.save(tmp_path / "tok")
    weights = tmp_path / "tok" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        ImageTokenizer.load(tmp_path / "tok")
    weights.unlink()
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        ImageTokenizer.load(tmp_path / "tok")
    model.save(tmp_path / "tok")
    (tmp_path / "tok" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=CONFIG_FILE):
        ImageTokenizer.load(tmp_path / "tok")


def test_wrong_shapes_raise_value_error(model):
    with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\).*\(2, 28, 28, 3\)"):
        model.encode(np.zeros((2, 28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(32, 32, 3\)"):
        model.encode(np.zeros((32, 32, 3), np.uint8))  # missing batch dim
    with pytest.raises(ValueError, match="uint8"):
        model.encode(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        model(torch.zeros(1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"\(B, 64\)"):
        model.decode(torch.zeros(1, 63, dtype=torch.long))
    with pytest.raises(ValueError, match="codes must lie"):
        model.decode(torch.full((1, 64), model.codebook_size))


def test_config_is_plain_data():
    config = ImageTokenizerConfig(steps=10, shape_levels=[5, 5])
    assert ImageTokenizerConfig.from_dict(asdict(config)) == config
    with pytest.raises(ConfigError, match="bogus"):
        ImageTokenizerConfig.from_dict({"bogus": 1})


def test_short_training_lowers_loss(world):
    calls = []
    config = ImageTokenizerConfig(steps=150, warmup_steps=10, **SMALL)
    model, stats = train_image_tokenizer(world, config, seed=0, progress=lambda *a: calls.append(a),
                                         judge=ShapesJudge(world))
    assert stats["steps"] == 150 and len(calls) == 150 and calls[-1][:2] == (150, 150)
    assert stats["final_loss"] < 0.8 * stats["initial_loss"]
    for key in ("psnr_db", "codebook_usage", "codebook_usage_shape", "codebook_usage_colour",
                "judge_exact", "judge_exact_heldout_combo", "train_seconds"):
        assert key in stats
    assert not model.training


def test_time_budget_stops_early(world):
    config = ImageTokenizerConfig(steps=10_000, **SMALL)
    _, stats = train_image_tokenizer(world, config, time_budget_s=2.0)
    assert stats["steps"] < 10_000
    # No judge given: the stats say how well the training pool is reconstructed, nothing judged.
    assert "psnr_db" in stats and "judge_exact" not in stats


@pytest.mark.slow
def test_default_training_reconstructs_exactly(world):
    """The real default recipe (about 1.5 minutes on 2 CPU cores, more when the machine is busy)."""
    _, stats = train_image_tokenizer(world, ImageTokenizerConfig(), seed=0, judge=ShapesJudge(world))
    assert stats["judge_exact"] >= 0.97
    assert stats["judge_exact_heldout_combo"] >= 0.97
