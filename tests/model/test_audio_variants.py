"""Continuous audio (nmm.model.fusion.audio): the early-continuous, late and mid variants read the
codec's latents, keep packed utterances apart, write text only, and leave discrete audio as it was."""

import pytest
import torch

from nmm.config import AudioEncoderConfig, ModelConfig
from nmm.errors import ConfigError
from nmm.modalities.base import ModalitySpec
from nmm.modalities.vocab import Vocabulary
from nmm.model.fusion import AUDIO_VARIANTS, ContinuousAudio, LateFusionAudio, MidFusionAudio
from nmm.model.fusion.discrete import DiscreteCodes
from nmm.model.masks import SpanLayout
from nmm.model.model import NativeMultimodalModel

SPEECH = ModalitySpec("audio", "<boa>", "<eoa>", codes=20, factors=(5, 4), levels=((5,), (4,)), tokens_per_item=None)
VOCAB = Vocabulary(40, (SPEECH,))
AXES = {"early-continuous": ("early", "continuous"), "late": ("late", "continuous"), "mid": ("mid", "continuous")}


def model_for(variant: str, seed: int = 0) -> NativeMultimodalModel:
    fusion, repr_ = AXES.get(variant, ("early", "discrete"))
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=96,
                      audio_fusion=fusion, audio_repr=repr_, cross_attn_every=1,
                      audio_encoder=AudioEncoderConfig(width=16, layers=2))
    return NativeMultimodalModel(cfg, VOCAB).eval()


def utterance(codes: list[int]) -> list[int]:
    return [VOCAB.begin("audio"), *(VOCAB.start("audio") + c for c in codes), VOCAB.end("audio")]


def open_gates(model):
    for layer in model.backbone.cross_attn:  # Flamingo's gates start closed (tanh(0) = 0)
        with torch.no_grad():
            layer.attn_gate.fill_(1.0)
            layer.ffn_gate.fill_(1.0)


def test_the_config_axes_pick_the_interfaces():
    assert model_for("early-discrete").modalities["audio"].__class__ is DiscreteCodes
    for variant, cls in (("early-continuous", ContinuousAudio), ("late", LateFusionAudio), ("mid", MidFusionAudio)):
        interface = model_for(variant).modalities["audio"]
        assert type(interface) is cls is AUDIO_VARIANTS[variant]
        assert interface.capabilities == ("M2T",) and not interface.emits_codes
    with pytest.raises(ConfigError, match="model.audio_fusion=late .* model.audio_repr=continuous"):
        ModelConfig(audio_fusion="late")
    with pytest.raises(ConfigError, match="'model.audio_repr': 'flow' is not one of discrete, continuous"):
        ModelConfig(audio_repr="flow")
    with pytest.raises(ConfigError, match="only one modality can use mid fusion"):
        ModelConfig(fusion="mid", image_repr="continuous", audio_fusion="mid", audio_repr="continuous")


@pytest.mark.parametrize("variant", list(AXES))
def test_continuous_audio_has_no_code_head_and_no_audio_loss(variant):
    model = model_for(variant)
    ids = torch.tensor([[VOCAB.bos, *utterance([1, 7, 3, 19, 0]), 5, 6, VOCAB.eos]])
    logits = model(ids)
    lo, hi = VOCAB.range("audio")
    assert torch.isinf(logits[..., lo:hi]).all() and torch.isfinite(logits[..., : VOCAB.n_text]).all()
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    loss, stats = model.train().loss(ids, targets, torch.arange(ids.shape[1])[None], torch.zeros_like(ids), {})
    assert "loss_audio" not in stats and int(stats["tokens_text"]) == 4  # <boa>, after <eoa>: 5, 6, <eos>
    loss.backward()
    audio = model.modalities["audio"]
    grads = [p.grad for p in audio.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)  # the projector / encoder trains with the model


@pytest.mark.parametrize("variant", ["early-continuous", "late"])
def test_the_latents_are_the_codecs_and_reach_the_embedding(variant):
    """A frame's input is a function of its code's latent: two codes with the same latent would embed
    alike; different codes embed differently (the latent table is the vocabulary's closed form)."""
    model = model_for(variant)
    audio = model.modalities["audio"]
    torch.testing.assert_close(audio.latents, VOCAB.code_latents("audio"))
    a = torch.tensor([[VOCAB.bos, *utterance([1, 2, 3]), 5]])
    b = torch.tensor([[VOCAB.bos, *utterance([1, 9, 3]), 5]])
    ea, eb = model.embed(a), model.embed(b)
    assert not torch.allclose(ea[0, 3], eb[0, 3])  # the changed frame
    torch.testing.assert_close(ea[0, :2], eb[0, :2])  # text before it is untouched
    if variant == "early-continuous":  # no encoder: the other frames are untouched too
        torch.testing.assert_close(ea[0, [2, 4]], eb[0, [2, 4]])
    else:  # the encoder's convolution spreads the change to neighbouring frames of the same utterance
        assert not torch.allclose(ea[0, 2], eb[0, 2])


def test_the_encoder_never_mixes_two_utterances_of_one_row():
    model = model_for("late")
    first = utterance([4, 4, 2, 8, 1])
    a = torch.tensor([[VOCAB.bos, *first, 5, *utterance([3, 3, 3, 3])]])
    b = torch.tensor([[VOCAB.bos, *first, 5, *utterance([9, 0, 17, 6])]])
    layout = SpanLayout.of(a, VOCAB)["audio"]
    fa = model.modalities["audio"].features(a, layout, torch.float32)
    fb = model.modalities["audio"].features(b, SpanLayout.of(b, VOCAB)["audio"], torch.float32)
    torch.testing.assert_close(fa[0, 2:7], fb[0, 2:7])  # the first utterance's frames: unchanged
    assert not torch.allclose(fa[0, 9:13], fb[0, 9:13])


def test_mid_fusion_text_reads_earlier_audio_only():
    model = model_for("mid")
    open_gates(model)
    a = torch.tensor([[VOCAB.bos, 5, 6, *utterance([1, 2, 3, 4]), 7, 8]])
    b = torch.tensor([[VOCAB.bos, 5, 6, *utterance([9, 9, 0, 11]), 7, 8]])
    la, lb = model(a), model(b)
    torch.testing.assert_close(la[0, :3], lb[0, :3])  # text before the utterance cannot see it
    assert not torch.allclose(la[0, -2:], lb[0, -2:])  # text after it reads it through cross-attention
    emb = model.embed(a)[0, 4:8]
    assert torch.equal(emb, emb[:1].expand_as(emb))  # the frames themselves hold one placeholder


def test_a_continuous_audio_model_is_refused_roles_that_write_audio():
    from nmm.config import load_config
    from nmm.train.trainer import check_roles

    cfg = load_config("speech-tiny", ["model.audio_fusion=late", "model.audio_repr=continuous"])
    model = NativeMultimodalModel(cfg.model, VOCAB)
    with pytest.raises(ConfigError, match="reads audio through its late interface, which cannot generate audio: "
                                          "set data.roles.synthesis=0"):
        check_roles(cfg, model)
    cfg = load_config("speech-tiny", ["model.audio_fusion=late", "model.audio_repr=continuous",
                                      "data.roles={transcription: 1.0}"])
    check_roles(cfg, model)  # reading only: fine
