"""The KV cache of generation: one `RowCache` per layer, the keys and values of a batch of rows.

Stands in for `nmm.model.transformer.KVCache`: attention only calls `update(start, k, v)` and attends
over what it returns, so the caller decides here where each row writes and what it reads:

- `rows` None and `write` None: every row, written from column `start` (a fixed batch whose rows all
  advance together: `Engine.generate`, prefill and decode alike);
- `rows` a slice: those rows, written from column `start` (the Scheduler's prefill of new requests);
- `write` a (B,) tensor: rows 0..B-1, row i writing its one token at column write[i], attending over
  the first `kv_len` columns (the Scheduler's decode, every row at its own length).

A plain object, not an nn.Module: torch.compile takes a module's buffers to have fixed shapes, which
would bake the batch size into a compiled step; plain tensors can keep a dynamic batch.
"""

from __future__ import annotations

import torch

from nmm.model.transformer import LayerCaches


class RowCache:
    """One layer's keys and values, (rows, n_kv_heads, max_len, head_dim)."""

    def __init__(self, rows: int, n_kv: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.zeros(rows, n_kv, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.rows: slice | None = None
        self.write: torch.Tensor | None = None
        self.kv_len: int | None = None  # per-row writes: columns to attend over; None = all

    @classmethod
    def layers(cls, cfg, rows: int, max_len: int, dtype, device) -> LayerCaches:
        """One cache per layer of a model config, in the list `model.hidden` takes (it can also hold mid
        fusion's image features)."""
        return LayerCaches(cls(rows, cfg.n_kv_heads, max_len, cfg.d_model // cfg.n_heads, dtype, device)
                           for _ in range(cfg.n_layers))

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.write is None:  # a block of columns from `start`, for all rows or for `rows`
            end = start + k.shape[2]
            ck, cv = (self.k, self.v) if self.rows is None else (self.k[self.rows], self.v[self.rows])  # views
            ck[:, :, start:end] = k
            cv[:, :, start:end] = v
            return ck[:, :, :end], cv[:, :, :end]
        ck, cv = self.k[: k.shape[0]], self.v[: k.shape[0]]
        index = self.write.view(-1, 1, 1, 1).expand(-1, k.shape[1], 1, k.shape[3])
        ck.scatter_(2, index, k)
        cv.scatter_(2, index, v)
        if self.kv_len is None:
            return ck, cv
        return ck[:, :, : self.kv_len], cv[:, :, : self.kv_len]

    def move(self, src: int, dst: int) -> None:
        self.k[dst] = self.k[src]
        self.v[dst] = self.v[src]
