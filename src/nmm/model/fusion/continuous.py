"""Early fusion with continuous images (Transfusion, Zhou et al. 2024).

An image is N continuous latent vectors in the sequence (the image tokenizer's latents, one per
patch), embedded by a linear layer plus a timestep embedding. The code positions of one image
attend to each other in both directions; the document stays causal around them. Images the
model must produce are noised during training (rectified flow: x_t = t*x1 + (1-t)*x0, t ~
logit-normal) and a flow head predicts the velocity x1 - x0 at each of their positions; images it
reads are clean (t = 1). Loss = LM cross-entropy on text + lambda * flow MSE.

Generation integrates the velocity field with Euler steps from noise (t = 0) to data (t = 1),
with classifier-free guidance against the empty caption, then snaps each latent to the nearest
code of the tokenizer's grid so the tokenizer's decoder draws it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nmm.model.fusion.base import LossTerm, ModalityInterface, item_capacity, loss_rows


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(…,) in [0, 1] -> (…, dim) sinusoidal features (as in DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = (t.float() * 1000.0).unsqueeze(-1) * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class ContinuousImages(ModalityInterface):
    fusion, representation = "early", "continuous"
    capabilities = ("M2T", "M2G", "M2M")
    bidirectional = True

    def __init__(self, cfg, vocab, name="image"):
        super().__init__(cfg, vocab, name)
        D, f = cfg.d_model, cfg.flow
        self.register_buffer("latents", vocab.code_latents(), persistent=False)  # (codes, L)
        L = self.latents.shape[1]
        self.latent_in = nn.Linear(L, D)
        self.time_mlp = nn.Sequential(nn.Linear(64, D), nn.SiLU(), nn.Linear(D, D))
        self.flow_head = nn.Sequential(nn.Linear(D, f.head_hidden), nn.SiLU(), nn.Linear(f.head_hidden, L))

    # ---- input ------------------------------------------------------------------------------
    def embed(self, x, ids, layout, generated, image_inputs):
        codes = torch.where(layout.is_code, self.vocab.codes(self.name, ids), 0)
        lat = self.latents[codes]  # (B, T, L): clean latents of the images the model reads
        t = torch.ones(ids.shape, device=ids.device)
        if image_inputs is not None:  # noisy latents of the images being generated
            noisy = image_inputs["noisy"]
            lat = torch.where(noisy.unsqueeze(-1), image_inputs["x_t"], lat)
            t = torch.where(noisy, image_inputs["t"], t)
        h = self.latent_in(lat.to(x.dtype)) + self.time_mlp(timestep_embedding(t, 64).to(x.dtype))
        return torch.where(layout.is_code.unsqueeze(-1), h, x)

    # ---- training -----------------------------------------------------------------------------
    def training_inputs(self, ids, layout, generated):
        noisy = layout.is_code & generated & (layout.item >= 0)
        B = ids.shape[0]
        I = item_capacity(layout, self.spec.tokens_per_item)
        t_image = torch.sigmoid(torch.randn(B, I, device=ids.device))  # logit-normal (SD3): mid-noise matters most
        t = t_image.gather(1, layout.item.clamp(min=0))  # (B, T): one timestep per image
        x1 = self.latents[torch.where(layout.is_code, self.vocab.codes(self.name, ids), 0)]
        x0 = torch.randn_like(x1)
        x_t = t.unsqueeze(-1) * x1 + (1 - t.unsqueeze(-1)) * x0
        return {"noisy": noisy, "t": t, "x_t": x_t, "velocity": x1 - x0}

    def loss(self, h, targets, layout, generated, image_inputs, z_loss):
        keep, (h, velocity) = loss_rows(image_inputs["noisy"], h, image_inputs["velocity"])  # (R, D), (R, L)
        mse = (self.flow_head(h).float() - velocity).pow(2).sum(-1)  # (R,)
        term = LossTerm.masked(mse, keep)
        return {"flow": LossTerm(self.cfg.flow.loss_weight * term.total, term.report, term.count)}

    # ---- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, model, prompts: list[list[int]], cfg_scale: float = 2.0, steps: int | None = None,
               seed: int | None = 0, uncond_prompt: list[int] | None = None) -> torch.Tensor:
        """Prompts ending in `<boi>` -> image codes (B, N), by Euler integration of the flow."""
        v, N = self.vocab, self.vocab.tokens_per_image
        steps = steps or self.cfg.flow.sample_steps
        device = self.latents.device
        guided = cfg_scale != 1.0 and uncond_prompt is not None
        rows = prompts + ([uncond_prompt] * len(prompts) if guided else [])
        P = max(len(p) for p in rows)
        R, n = len(rows), len(prompts)
        ids = torch.full((R, P + N), v.pad, dtype=torch.long, device=device)
        valid = torch.zeros(R, P + N, dtype=torch.bool, device=device)
        for i, p in enumerate(rows):  # left-pad, then N code slots (their ids only mark the layout)
            ids[i, P - len(p) : P] = torch.tensor(p, device=device)
            valid[i, P - len(p) :] = True
        ids[:, P:] = v.ids(self.name, 0)
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        T = P + N
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        mask = ((causal & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=device)).unsqueeze(1)
        noisy = torch.zeros(R, T, dtype=torch.bool, device=device)
        noisy[:, P:] = True

        gen = torch.Generator(device=device)
        if seed is not None:
            gen.manual_seed(seed)
        else:
            gen.seed()
        x = torch.randn(n, N, self.latents.shape[1], generator=gen, device=device)
        shift = self.cfg.flow.time_shift
        grid = torch.linspace(0, 1, steps + 1, device=device)
        grid = grid / (grid + shift * (1 - grid))  # shift > 1 spends more steps near the noise end
        for i in range(steps):
            t0, t1 = float(grid[i]), float(grid[i + 1])
            xs = torch.cat([x, x]) if guided else x
            x_t = torch.zeros(R, T, x.shape[-1], device=device)
            x_t[:, P:] = xs
            inputs = {"noisy": noisy, "t": torch.full((R, T), t0, device=device), "x_t": x_t}
            h = model.hidden(ids, positions, mask, image_inputs=inputs)[:, P:]  # (R, N, D)
            vel = self.flow_head(h).float()
            if guided:
                vel = vel[n:] + cfg_scale * (vel[:n] - vel[n:])
            x = x + (t1 - t0) * vel
        return self.snap(x)

    def snap(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, L) latents -> (B, N) nearest codes of the tokenizer's grid."""
        d = torch.cdist(x.reshape(-1, x.shape[-1]), self.latents.to(x.dtype))  # (B*N, codes)
        return d.argmin(dim=1).view(x.shape[:-1])
