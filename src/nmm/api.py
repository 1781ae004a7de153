"""The Python API: `nmm.load(run_dir)` -> `Pipeline` with the model, its codecs and generation.

    import nmm
    pipe = nmm.load("runs/demo")
    images = pipe.generate_images(["a small red circle at the top left"])
    print(pipe.caption(images))
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from nmm.config import ModelConfig, _build
from nmm.errors import CheckpointError, InputError
from nmm.infer.engine import Engine
from nmm.infer.sampling import SamplingConfig
from nmm.modalities.codecs import Codecs
from nmm.modalities.document import Document, ItemSegment, TextSegment
from nmm.model.model import NativeMultimodalModel
from nmm.quant import load_weights_at, params_on_meta, resolve_precision


class Pipeline:
    def __init__(self, model: NativeMultimodalModel, codecs: Codecs, device: str | torch.device = "cpu"):
        self.model, self.codecs, self.vocab = model, codecs, codecs.vocab
        self.engine = Engine(model, device)

    # ---- prompts -------------------------------------------------------------------------------
    def _image_ids(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        size = self.codecs.image.config.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
            raise InputError(f"images must be uint8 of shape (N, {size}, {size}, 3), got {images.dtype} {images.shape}")
        return self.codecs.encode_images(images)

    def _check_length(self, prompt: list[int], new_tokens: int) -> None:
        limit = self.model.cfg.max_seq_len
        if len(prompt) + new_tokens > limit:
            raise InputError(f"prompt is {len(prompt)} tokens; with {new_tokens} new tokens it exceeds the "
                             f"model's context of {limit} tokens")

    def item_prompt(self, name: str, text: str) -> list[int]:
        """`<bos> text <begin(name)>`: the prompt that has the model write an item of `name` for `text`
        (`<boi>` for an image of a caption, `<boa>` for speech of a sentence)."""
        return self.codecs.prompt([text] if text else [], open_item=name)

    def image_prompt(self, caption: str) -> list[int]:
        return self.item_prompt("image", caption)

    def uncond_image_prompt(self) -> list[int]:
        """`<bos> <boi>`: an image with no caption, what classifier-free guidance steers away from."""
        return self.item_prompt("image", "")

    # ---- tasks ----------------------------------------------------------------------------------
    def generate_items(self, name: str, prompts: list[str], cfg_scale: float = 2.0, temperature: float = 0.3,
                       top_k: int | None = None, top_p: float | None = None, seed: int | None = 0,
                       batch_size: int = 32, max_tokens: int | None = None):
        """Text -> items of modality `name` (images (N, H, W, 3) uint8; waveforms, a list of 1-D float32
        arrays), with classifier-free guidance against an empty prompt. `max_tokens` caps a
        variable-length item (default: what the context leaves)."""
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale, seed=seed)
        out: list = []
        for i in range(0, len(prompts), batch_size):
            chunk = [self.item_prompt(name, p) for p in prompts[i : i + batch_size]]
            ids = self.item_codes(name, chunk, sampling, uncond=self.item_prompt(name, ""), max_tokens=max_tokens)
            out += list(ids)
        if self.vocab.spec(name).fixed_length:
            return self.codecs.decode_items(name, np.stack(out) if out else np.zeros((0, self.vocab.spec(name).tokens_per_item), np.int64))
        return self.codecs.decode_items(name, out)

    def generate_images(self, prompts: list[str], cfg_scale: float = 2.0, temperature: float = 0.3,
                        top_k: int | None = None, top_p: float | None = None, seed: int | None = 0,
                        batch_size: int = 32) -> np.ndarray:
        """Text -> images (N, H, W, 3) uint8, with classifier-free guidance against an empty caption."""
        return self.generate_items("image", prompts, cfg_scale, temperature, top_k, top_p, seed, batch_size)

    def speak(self, texts: list[str], cfg_scale: float = 1.0, temperature: float = 0.3, seed: int | None = 0,
              batch_size: int = 32, **kw) -> list[np.ndarray]:
        """Text -> speech: 1-D float32 waveforms at the audio codec's sample rate."""
        return self.generate_items("audio", texts, cfg_scale, temperature, seed=seed, batch_size=batch_size, **kw)

    def image_codes(self, prompts: list[list[int]], sampling: SamplingConfig, uncond: list[int] | None) -> np.ndarray:
        """Prompts ending in `<boi>` -> (B, N) image ids (`item_codes` for images)."""
        return self.item_codes("image", prompts, sampling, uncond)

    def item_codes(self, name: str, prompts: list[list[int]], sampling: SamplingConfig, uncond: list[int] | None,
                   max_tokens: int | None = None) -> np.ndarray | list[np.ndarray]:
        """Prompts ending in `name`'s begin token -> the items' ids: (B, N) for a fixed length, else one
        1-D array per prompt (its codes up to the sampled end token). Sampled code by code by the
        engine, or by the interface's own sampler (a flow for continuous images). `uncond`: the
        unconditional prompt of classifier-free guidance (used when `sampling.cfg_scale` != 1)."""
        interface, spec = self.model.modalities[name], self.vocab.spec(name)
        if "M2G" not in interface.capabilities:
            raise InputError(f"this model ({self.model.cfg.variant_of(name)} {name}) reads {name} items but cannot generate them")
        if not interface.emits_codes:
            codes = interface.sample(self.model, prompts, cfg_scale=sampling.cfg_scale, seed=sampling.seed,
                                     uncond_prompt=uncond)
            return self.vocab.ids(name, codes.cpu().numpy())
        room = self.model.cfg.max_seq_len - max(len(p) for p in prompts)
        if spec.fixed_length:
            new = spec.tokens_per_item + 1
            for p in prompts:
                self._check_length(p, new)
        else:
            new = min(room, (max_tokens or room) + 1)
            if new < 2:
                raise InputError(f"a prompt of {max(len(p) for p in prompts)} tokens leaves no room for a {name} item "
                                 f"in the model's context of {self.model.cfg.max_seq_len} tokens")
        guided = uncond is not None and sampling.cfg_scale != 1.0
        res = self.engine.generate(prompts, new, sampling, uncond_prompts=[uncond] * len(prompts) if guided else None,
                                   stop_after_image=True, allow_images=(name,))
        if spec.fixed_length:
            return np.stack([t[: spec.tokens_per_item] for t in res.tokens])
        end = self.vocab.end(name)
        # After the begin token the decoder allows only this modality's codes and its end token.
        # An item cut off by the budget keeps at most `new - 1` codes (the last step was reserved for the end).
        return [np.asarray(t[: t.index(end)] if end in t else t[: new - 1], dtype=np.int64) for t in res.tokens]

    def complete_text(self, prompts: list[list[int]], max_new_tokens: int = 48, temperature: float = 0.0,
                      seed: int | None = 0, batch_size: int = 64, **kw) -> list[str]:
        sampling = SamplingConfig(temperature=temperature, seed=seed, **kw)
        texts = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            for p in chunk:
                self._check_length(p, 1)
            new = min(max_new_tokens, self.model.cfg.max_seq_len - max(len(p) for p in chunk))
            res = self.engine.generate(chunk, new, sampling, allow_images=False)
            texts += [self.codecs.decode_text(t).strip() for t in res.tokens]
        return texts

    def caption(self, images: np.ndarray, **kw) -> list[str]:
        """Images (N, H, W, 3) uint8 -> captions."""
        return self._caption_ids(self._image_ids(images), **kw)

    def _caption_ids(self, ids: np.ndarray, **kw) -> list[str]:
        """(N, tokens_per_image) image ids -> captions."""
        return self.complete_text([self.codecs.prompt([ItemSegment("image", codes=c)]) for c in ids], **kw)

    def describe(self, name: str, items, **kw) -> list[str]:
        """Items of modality `name` -> the text the model writes after each (its caption, transcript)."""
        ids = self.codecs.encode_items(name, items if isinstance(items, np.ndarray) else list(items))
        return self.complete_text([self.codecs.prompt([ItemSegment(name, codes=c)]) for c in ids], **kw)

    def transcribe(self, waves: list[np.ndarray], **kw) -> list[str]:
        """Speech (1-D float32 waveforms at the codec's rate) -> text."""
        return self.describe("audio", list(waves), **kw)

    def answer(self, images: np.ndarray, questions: list[str], caption_first: bool = False, **kw) -> list[str]:
        """Short answers to one question per image. `caption_first` (a model trained with
        `data.qa_caption_first`): the model captions each image, then answers after its own caption."""
        ids = self._image_ids(images)
        captions = self._caption_ids(ids, **kw) if caption_first else [None] * len(questions)
        prompts = [self.codecs.prompt([ItemSegment("image", codes=c), *([cap] if cap else []), q])
                   for c, cap, q in zip(ids, captions, questions)]
        return self.complete_text(prompts, max_new_tokens=8, **kw)

    def edit(self, images: np.ndarray, instructions: list[str], cfg_scale: float = 1.0, temperature: float = 0.3,
             seed: int | None = 0) -> np.ndarray:
        # The training layout (nmm.data.mixture's edit role): instruction, old image, new image.
        prompts = [self.codecs.prompt([t, ItemSegment("image", codes=c)], open_item="image")
                   for c, t in zip(self._image_ids(images), instructions)]
        sampling = SamplingConfig(temperature=temperature, seed=seed, cfg_scale=cfg_scale)
        return self.codecs.decode_images(self.item_codes("image", prompts, sampling, uncond=None))

    @torch.no_grad()
    def perplexity(self, texts: list[str]) -> float:
        """Per-token perplexity of plain text documents (<bos> text <eos>)."""
        nll, count = 0.0, 0
        for text in texts:
            ids = self.codecs.encode_document(Document([TextSegment(text)]))[0][: self.model.cfg.max_seq_len]
            x = torch.tensor([ids], device=self.engine.device)
            logits = self.model.text_head(self.model.hidden(x))[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += len(ids) - 1
        return float(np.exp(nll / max(count, 1)))


def load(path: str | Path, device: str | None = None, dtype: str | torch.dtype | None = None,
         quantize: str | None = None) -> Pipeline:
    """Load a trained run directory (model.safetensors, model.json and the codecs).

    `dtype`: "fp32" (default) | "bf16" | "int8" (int8 weight-only linear layers, the rest fp32), or
    torch.float32 / torch.bfloat16. `quantize`: None | "int8" (int8 linear layers, the rest in `dtype`:
    `dtype="bf16", quantize="int8"`). The weights are read tensor by tensor straight into that precision,
    so a bf16 or int8 load never holds an fp32 copy of the model (`nmm.quant`, docs/checkpoints.md)."""
    precision = resolve_precision(dtype, quantize)  # a bad value fails before any file is read
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    if not (run_dir / "model.safetensors").exists():
        raise CheckpointError(f"{run_dir}: no model.safetensors (has training finished?)")
    try:
        model_cfg = _build(ModelConfig, json.loads((run_dir / "model.json").read_text()))
    except (OSError, ValueError):
        raise CheckpointError(f"{run_dir / 'model.json'}: missing or corrupt") from None
    codecs = Codecs.load(run_dir)
    with params_on_meta():
        model = NativeMultimodalModel(model_cfg, codecs.vocab)
    load_weights_at(model, run_dir / "model.safetensors", precision)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Pipeline(model.to(device).eval(), codecs, device)
