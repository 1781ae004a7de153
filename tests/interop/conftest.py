"""A tiny random Chameleon checkpoint, laid out like the real one, built with transformers (no hub).

The vocabulary follows Chameleon-7B's: `<s> <pad> </s> <unk>` at 0..3, then the image tokens
`IMGIMG...Z` (here with codes shuffled over their ids, so nothing relies on code c sitting at 4 + c),
`<eoss>` and `<racm3:break>` (end / begin of an image), a reserved token and `<image>`, then a BPE
text vocabulary with a BOS post-processor, as Chameleon's tokenizer.json has. Weights are random at a
scale that gives logits of order 1-10 (transformers' 0.02 init would make every parity check trivial),
and every norm weight and bias is perturbed, so a swapped or shared norm cannot pass.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

N_CODES = 48  # VQ codebook (not the 64 tokens per image, so the two cannot be confused)
RESOLUTION = 32  # VQ input; channel_multiplier [1, 1, 2] downsamples by 4: an 8x8 grid, 64 tokens per image
CORPUS = ["a small red circle at the top left of the picture", "a large blue square in the middle",
          "two green triangles and one yellow star", "the quick brown fox jumps over the lazy dog",
          "what colour is the circle? it is red.", "Chameleon reads and writes images and text."] * 20


# ---- shared by the interop tests' builders (test_emu3.py and test_janus.py load this file by path) ----
def trained_bpe(corpus: list[str]) -> dict:
    """tokenizer.json (as a dict) of a byte-level BPE of 330 ids trained on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=330, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return json.loads(bpe.to_str())


def ramp_picture(seed: int, size: int) -> np.ndarray:
    """A (size, size, 3) uint8 picture: noise over a ramp, so a VQ sees structure at every scale."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)[None, :, None] * np.ones((size, 1, 3))
    return np.clip(ramp + rng.normal(0, 60, (size, size, 3)), 0, 255).astype(np.uint8)


def chameleon_tokenizer(n_codes: int, seed: int = 0) -> tuple[dict, dict[str, int]]:
    """(tokenizer.json as a dict, token -> id over the whole vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    learned = trained_bpe(CORPUS)
    from nmm.interop.chameleon import image_token_name

    order = np.random.default_rng(seed).permutation(n_codes)  # token at id 4 + k is code order[k]
    head = ["<s>", "<pad>", "</s>", "<unk>", *[image_token_name(int(c)) for c in order], "<eoss>", "<racm3:break>",
            "<reserved08706>", "<image>"]
    vocab = {t: i for i, t in enumerate(head)}
    for token, _ in sorted(learned["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab[token] = len(vocab)
    specials = [t for t in head if not t.startswith("IMGIMG")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in learned["model"]["merges"]], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    data = json.loads(tok.to_str())
    assert tok.get_vocab_size() == len(vocab) and all(tok.token_to_id(t) == i for t, i in vocab.items())
    return data, vocab


def randomize(model: torch.nn.Module, seed: int, batchnorm: bool = False) -> None:
    """Weights at a scale where the logits are of order 1-10; norms and biases away from 1 and 0;
    `batchnorm`: BatchNorm statistics away from 0 and 1 too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = math.prod(p.shape[1:])
                std = 1.0 if "embed_tokens" in name or "embedding" in name else 1.5 / math.sqrt(fan_in)
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers() if batchnorm else ():
            if name.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))


def build_chameleon(directory: Path, seed: int = 0, swin_norm: bool = False, shard: str = "150KB", layers: int = 2):
    """Save a tiny random ChameleonForConditionalGeneration and its tokenizer / processor files in
    `directory`; returns the model (fp32, eval)."""
    from transformers import (
        ChameleonConfig,
        ChameleonForConditionalGeneration,
        ChameleonImageProcessorPil,
        PreTrainedTokenizerFast,
    )

    tokenizer, vocab = chameleon_tokenizer(N_CODES, seed)
    cfg = ChameleonConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=320, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, bos_token_id=0, pad_token_id=1, eos_token_id=2,
        swin_norm=swin_norm, vocabulary_map=vocab,
        vq_config=dict(embed_dim=16, num_embeddings=N_CODES, latent_channels=16, resolution=RESOLUTION, base_channels=32,
                       channel_multiplier=[1, 1, 2], num_res_blocks=1, attn_resolutions=[16]))
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(cfg)
    randomize(model, seed)
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size=shard)
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(directory)
    ChameleonImageProcessorPil(size={"shortest_edge": RESOLUTION},
                               crop_size={"height": RESOLUTION, "width": RESOLUTION}).save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def tiny():
    """The builders and sizes above, for tests (a conftest is not importable under --import-mode=importlib)."""
    return SimpleNamespace(build=build_chameleon, randomize=randomize, corpus=CORPUS, n_codes=N_CODES,
                           resolution=RESOLUTION)


@pytest.fixture(scope="session")
def chameleon(tmp_path_factory):
    """(source directory, transformers model): a sharded tiny Chameleon."""
    src = tmp_path_factory.mktemp("chameleon") / "hf"
    return src, build_chameleon(src)


@pytest.fixture(scope="session")
def imported(chameleon, tmp_path_factory):
    """(run directory, import summary) of the tiny Chameleon imported in fp32."""
    from nmm.interop import import_hf

    run = tmp_path_factory.mktemp("runs") / "chameleon"
    return run, import_hf(chameleon[0], run, dtype="fp32")
