"""Tests for the understanding image encoder of late / mid / decoupled fusion (nmm.model.vision)."""

import numpy as np
import pytest
import torch

from nmm.data.shapes import COLOURS, Scene, Shape, ShapesWorld
from nmm.modalities.image import ImageTokenizer, ImageTokenizerConfig
from nmm.modalities.image import image_spec
from nmm.modalities.vocab import Vocabulary
from nmm.model.vision import (
    ImageProjector,
    VisionEncoder,
    VisionEncoderConfig,
    cell_overlap,
    code_latents,
    freeze,
    pretrain_vision_encoder,
)

WORLD = ShapesWorld()
SMALL = VisionEncoderConfig(width=32, layers=2)
PALETTE = np.array([(0, 0, 0), *COLOURS.values()])


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second thread gains nothing, and when the machine's cores are busy
    (conftest asks for 2 threads) the threads' hand-offs made pretraining 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tokenizer(factorised: bool = True) -> ImageTokenizer:
    torch.manual_seed(0)
    return ImageTokenizer(ImageTokenizerConfig(factorised=factorised, channels=16)).eval()


def render(scenes) -> np.ndarray:
    return np.stack([WORLD.render(s) for s in scenes])


def ideal_codes(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> (N, 64) codes in the factorised layout (shape code * 16 + colour code), as
    a well-trained tokenizer would give them, but computed straight from the pixels: training a
    tokenizer that good takes over a minute, and what is under test here is the encoder.
    Colour code: palette index of the patch's brightest pixel (0 = black). Shape code: FSQ digits
    (lit count, top-bottom balance, left-right balance) of the patch's 4x4 lit mask over [8, 5, 5]."""
    N = len(images)
    patches = images.reshape(N, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(N, 64, 16, 3).astype(int)
    brightest = np.take_along_axis(patches, patches.sum(-1).argmax(-1)[..., None, None], 2)[:, :, 0]  # (N, 64, 3)
    colour = ((brightest[:, :, None] - PALETTE) ** 2).sum(-1).argmin(-1)  # (N, 64)
    lit = (patches.max(-1) > 64).reshape(N, 64, 4, 4)
    count = np.rint(lit.sum((2, 3)) * 7 / 16)
    vertical = np.clip(np.rint((lit[:, :, :2].sum((2, 3)) - lit[:, :, 2:].sum((2, 3))) / 4 + 2), 0, 4)
    horizontal = np.clip(np.rint((lit[..., :2].sum((2, 3)) - lit[..., 2:].sum((2, 3))) / 4 + 2), 0, 4)
    shape = (count + 8 * vertical + 40 * horizontal).astype(np.int64)
    return shape * 16 + colour


# ---- code_latents ---------------------------------------------------------------------------------
@pytest.mark.parametrize("factorised", [True, False], ids=["factorised", "plain"])
def test_code_latents_reproduce_the_tokenizers_quantised_latents(factorised):
    tok = tokenizer(factorised)
    table = code_latents(tok)
    latent_dim = 5 if factorised else 4
    assert table.shape == (tok.codebook_size, latent_dim) and table.dtype == torch.float32
    assert table.min() == -1 and table.max() == 1
    assert len(table.unique(dim=0)) == tok.codebook_size  # every code has its own latent
    # Real images through the tokenizer's own encoder...
    images = render(WORLD.scenes(8, seed=1, split="any"))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        values, codes = tok._encode(x)
    latents = torch.cat(values, 1).flatten(2).transpose(1, 2)  # (B, 64, latent_dim)
    torch.testing.assert_close(table[codes.flatten(1)], latents, atol=1e-6, rtol=0)
    assert torch.equal(codes.flatten(1), tok.encode(images))
    # ...but an untrained tokenizer uses few codes, so also quantise spread-out inputs through each
    # branch's FSQ to cover most of the codebook.
    branches = [tok.shape, tok.colour] if factorised else [tok.rgb]
    gen = torch.Generator().manual_seed(0)
    outs = [b.fsq(1.5 * torch.randn(64, len(b.fsq.levels.flatten()), 8, 8, generator=gen)) for b in branches]
    codes = tok.join_codes(*(c for _, c in outs))  # (64, 8, 8)
    assert len(codes.unique()) > tok.codebook_size // 4
    values = torch.cat([v for v, _ in outs], 1).permute(0, 2, 3, 1)  # (64, 8, 8, latent_dim)
    torch.testing.assert_close(table[codes], values, atol=1e-6, rtol=0)


def test_code_latents_agree_with_the_vocabulary():
    tok = tokenizer()
    c = tok.config
    vocab = Vocabulary(10, (image_spec(tok.codebook_size, tok.code_factors, 64,
                                       (tuple(c.shape_levels), tuple(c.colour_levels))),))
    torch.testing.assert_close(vocab.code_latents(), code_latents(tok))


# ---- encoder and projector ----------------------------------------------------------------------
def test_encoder_and_projector_shapes():
    torch.manual_seed(0)
    encoder = VisionEncoder(latent_dim=5, grid=8, cfg=SMALL)
    latents = torch.rand(3, 64, 5) * 2 - 1
    features = encoder(latents)
    assert features.shape == (3, 64, 32)
    # Features are per position: changing one corner's latent leaves the far corner untouched
    # at 2 layers (view: 7 positions across) but changes its neighbourhood.
    moved = latents.clone()
    moved[:, 0] = -moved[:, 0]
    delta = (encoder(moved) - features).abs().amax(-1).view(3, 8, 8)
    assert (delta[:, :3, :3] > 0).all() and (delta[:, 4:, 4:] == 0).all()
    assert ImageProjector(32, 48)(features).shape == (3, 64, 48)
    with pytest.raises(ValueError, match="latents of shape"):
        encoder(torch.zeros(3, 63, 5))
    default = VisionEncoder(5, 8)
    assert default.cfg == VisionEncoderConfig() and default(latents).shape == (3, 64, 96)


def test_frozen_or_trainable_is_a_matter_of_requires_grad():
    frozen = VisionEncoder(5, 8, SMALL)  # trainable=False by default, like LLaVA's first stage
    assert not frozen.trainable and not any(p.requires_grad for p in frozen.parameters())
    trainable = VisionEncoder(5, 8, VisionEncoderConfig(width=32, layers=2, trainable=True))
    assert trainable.trainable and all(p.requires_grad for p in trainable.parameters())
    assert freeze(trainable) is trainable and not trainable.trainable
    assert frozen.set_trainable(True).trainable
    # A frozen encoder passes no gradient to itself, while the projector on top of it still learns.
    frozen.set_trainable(False)
    projector = ImageProjector(32, 16)
    projector(frozen(torch.rand(2, 64, 5))).square().sum().backward()
    assert all(p.grad is None for p in frozen.parameters())
    assert all(p.grad is not None for p in projector.parameters())


# ---- pretraining --------------------------------------------------------------------------------
def test_cell_labels_and_overlap():
    scene = Scene((Shape("cross", "green", "small", 0), Shape("circle", "red", "large", 8)))
    labels = WORLD.cell_labels([scene])  # the world says what is in each cell
    assert labels.shape == (1, 9, 3)
    assert labels[0, 0].tolist() == [4, 2, 1] and labels[0, 8].tolist() == [1, 1, 2]  # 0 is "empty"
    assert (labels[0, 1:8] == 0).all()
    overlap = cell_overlap(WORLD, 8).view(9, 8, 8)
    # A 10 px cell over 4 px patches: 100 / 16 patches' worth of area, on 3-4 positions per axis.
    torch.testing.assert_close(overlap.sum((1, 2)), torch.full((9,), 100 / 16))
    assert overlap[0, :3, :3].gt(0).all() and overlap[0, 3:].eq(0).all() and overlap[0, :, 3:].eq(0).all()
    assert overlap[4, 2:6, 2:6].gt(0).all() and overlap[4, 3:5, 3:5].eq(1).all()
    # Rows are image rows: the top-right cell lies in the top rows, right columns.
    assert overlap[2, 0, 7] == 1 and overlap[2, 7, 0] == 0


@pytest.fixture(scope="module")
def pool():
    scenes = WORLD.scenes(600, seed=1)
    return ideal_codes(render(scenes)), scenes


def test_pretraining_learns_what_is_in_each_cell(pool):
    codes, scenes = pool
    table = code_latents(tokenizer())
    torch.manual_seed(0)
    encoder = VisionEncoder(table.shape[1], 8, SMALL)
    seen = []
    stats = pretrain_vision_encoder(encoder, table, codes, scenes, WORLD, steps=120, batch=32, lr=1e-2,
                                    seed=0, progress=lambda step, total: seen.append((step, total)),
                                    heldout_fraction=0.25)
    assert stats["steps"] == 120 and seen[-1] == (120, 120) and len(seen) == 120
    assert stats["train_images"] == 450 and stats["heldout_images"] == 150 and stats["seconds"] > 0
    # ~78% of cells are empty, so predicting "empty" everywhere already scores that much.
    baseline = stats["majority_baseline"]
    assert 0.7 < baseline < 0.85
    assert stats["heldout_cell_accuracy"] > baseline + 0.08, stats
    assert stats["train_cell_accuracy"] > baseline + 0.08, stats
    assert min(stats[f"heldout_{a}_accuracy"] for a in ("kind", "colour", "size")) > baseline + 0.08, stats
    assert not encoder.trainable  # frozen again afterwards, as its config says


def test_pretraining_is_deterministic_from_seed(pool):
    codes, scenes = pool
    codes, scenes = codes[:100], scenes[:100]
    table = code_latents(tokenizer())

    def run(seed: int):
        torch.manual_seed(0)
        encoder = VisionEncoder(table.shape[1], 8, VisionEncoderConfig(width=16, layers=1, trainable=True))
        rng_before = torch.get_rng_state()
        stats = pretrain_vision_encoder(encoder, table, codes, scenes, WORLD, steps=6, batch=16, seed=seed)
        assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
        assert encoder.trainable  # trainable=True: stays trainable after pretraining
        stats.pop("seconds")
        return encoder.state_dict(), stats

    (a, stats_a), (b, stats_b), (c, _) = run(0), run(0), run(1)
    assert stats_a == stats_b
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_pretraining_rejects_vocabulary_ids(pool):
    codes, scenes = pool
    table = code_latents(tokenizer())
    encoder = VisionEncoder(table.shape[1], 8, SMALL)
    with pytest.raises(ValueError, match="vocab.codes"):
        pretrain_vision_encoder(encoder, table, codes[:10] + len(table), scenes[:10], WORLD, steps=1)
    with pytest.raises(ValueError, match="matching the scenes"):
        pretrain_vision_encoder(encoder, table, codes[:10], scenes[:9], WORLD, steps=1)


class QuadrantWorld:
    """Not the shapes world: a 2x2 grid of 16 px cells, each empty, dim or bright. All that
    pretraining needs from a world is its cells and their labels."""

    image_size, n_cells, cell_px = 32, 4, 16
    cell_classes = {"brightness": ("empty", "dim", "bright")}

    def cell_origin(self, cell: int) -> tuple[int, int]:
        return divmod(cell, 2)[0] * 16, divmod(cell, 2)[1] * 16

    def cell_labels(self, scenes) -> np.ndarray:
        return np.asarray(scenes, dtype=np.int64)[..., None]  # a scene is its 4 cell classes


def test_pretraining_takes_its_cells_and_labels_from_the_world():
    world = QuadrantWorld()
    rng = np.random.default_rng(0)
    scenes = rng.integers(0, 3, size=(40, 4)).tolist()
    overlap = cell_overlap(world, 8).view(4, 8, 8)
    torch.testing.assert_close(overlap.sum((1, 2)), torch.full((4,), 16.0))  # 16x16 px = 16 patches
    table = code_latents(tokenizer())
    codes = rng.integers(0, len(table), size=(40, 64))
    encoder = VisionEncoder(table.shape[1], 8, SMALL)
    stats = pretrain_vision_encoder(encoder, table, codes, scenes, world, steps=3, batch=8)
    assert stats["steps"] == 3 and "heldout_brightness_accuracy" in stats
    assert 0 <= stats["heldout_cell_accuracy"] <= 1
