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
from nmm.train.checkpoint import load_state_dict_into, load_weights


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

    def image_prompt(self, caption: str) -> list[int]:
        """`<bos> caption <boi>`: the prompt that has the model draw `caption`."""
        return self.codecs.prompt([caption], open_item="image")

    def uncond_image_prompt(self) -> list[int]:
        """`<bos> <boi>`: an image with no caption, what classifier-free guidance steers away from."""
        return self.codecs.prompt([], open_item="image")

    # ---- tasks ----------------------------------------------------------------------------------
    def generate_images(self, prompts: list[str], cfg_scale: float = 2.0, temperature: float = 0.3,
                        top_k: int | None = None, top_p: float | None = None, seed: int | None = 0,
                        batch_size: int = 32) -> np.ndarray:
        """Text -> images (N, H, W, 3) uint8, with classifier-free guidance against an empty caption."""
        n_img = self.vocab.tokens_per_image
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale, seed=seed)
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk = [self.image_prompt(p) for p in prompts[i : i + batch_size]]
            for p in chunk:
                self._check_length(p, n_img + 1)
            out.append(self.image_codes(chunk, sampling, uncond=self.uncond_image_prompt()))
        return self.codecs.decode_images(np.concatenate(out))

    def image_codes(self, prompts: list[list[int]], sampling: SamplingConfig, uncond: list[int] | None) -> np.ndarray:
        """Prompts ending in `<boi>` -> (B, N) image ids: sampled code by code by the engine, or by the
        variant's own sampler (a flow for continuous images). `uncond`: the unconditional prompt of
        classifier-free guidance (used when `sampling.cfg_scale` != 1)."""
        images, n_img = self.model.images, self.vocab.tokens_per_image
        if "M2G" not in images.capabilities:
            raise InputError(f"this model ({self.model.cfg.variant} fusion) reads images but cannot generate them")
        if not images.emits_codes:
            codes = images.sample(self.model, prompts, cfg_scale=sampling.cfg_scale, seed=sampling.seed,
                                  uncond_prompt=uncond)
            return self.vocab.ids("image", codes.cpu().numpy())
        guided = uncond is not None and sampling.cfg_scale != 1.0
        res = self.engine.generate(prompts, n_img + 1, sampling, uncond_prompts=[uncond] * len(prompts) if guided else None,
                                   stop_after_image=True)
        return np.stack([t[:n_img] for t in res.tokens])


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
        prompts = [self.codecs.prompt([ItemSegment("image", codes=c)]) for c in self._image_ids(images)]
        return self.complete_text(prompts, **kw)

    def answer(self, images: np.ndarray, questions: list[str], **kw) -> list[str]:
        prompts = [self.codecs.prompt([ItemSegment("image", codes=c), q])
                   for c, q in zip(self._image_ids(images), questions)]
        return self.complete_text(prompts, max_new_tokens=8, **kw)

    def edit(self, images: np.ndarray, instructions: list[str], cfg_scale: float = 1.0, temperature: float = 0.3,
             seed: int | None = 0) -> np.ndarray:
        prompts = [self.codecs.prompt([ItemSegment("image", codes=c), t], open_item="image")
                   for c, t in zip(self._image_ids(images), instructions)]
        sampling = SamplingConfig(temperature=temperature, seed=seed, cfg_scale=cfg_scale)
        return self.codecs.decode_images(self.image_codes(prompts, sampling, uncond=None))

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


def load(path: str | Path, device: str | None = None) -> Pipeline:
    """Load a trained run directory (model.safetensors, model.json and the codecs)."""
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
    model = NativeMultimodalModel(model_cfg, codecs.vocab)
    load_state_dict_into(model, load_weights(run_dir / "model.safetensors"), run_dir / "model.safetensors")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Pipeline(model.to(device).eval(), codecs, device)
