"""Rotary positions in space and time (M-RoPE, Qwen2-VL): `model.rope=mrope`.

With 1D RoPE a token's position is its index in the document. M-RoPE gives each token three
positions (time, row, column), and splits the head's rotary frequencies between them
(`ModelConfig.rope_sections`). A code at row r, column c of frame f of an item (its spec's
`grid`) whose first code sits at 1D position s is at (s + f, s + r, s + c): codes that are
neighbours in the picture are neighbours in position, above and below as well as left and right,
and frame f of a clip is one step of time after frame f - 1. Every other token (text, specials,
grid-less codes such as audio, a delta clip's changes after its key frame) is at (p, p, p), which
rotates every frequency by p: exactly 1D RoPE. Text after an item keeps counting from its 1D
position (Qwen2-VL compresses it to the item's largest position + 1; nmm does not, so positions
stay the ones the data pipeline and the engine already give).

Where an item starts is read from its begin token: in a packed training chunk or a prompt the
begin token is in the chunk; a decode step is one token, so the last begin per row is carried in
the caches (`LayerCaches.item_start`), which a new sequence (a call from cache slot 0) resets.
"""

from __future__ import annotations

import math

import torch

from nmm.modalities.vocab import Vocabulary


def _cache_rows(caches, batch: int):
    """Which rows of the caches this chunk's rows are (the Scheduler prefills a slice of them)."""
    rows = getattr(caches[0], "rows", None) if len(caches) else None
    return rows if rows is not None else slice(0, batch)


def item_starts(ids: torch.Tensor, positions: torch.Tensor, begin: int, name: str, caches=None,
                start: int = 0) -> torch.Tensor:
    """(B, T) -> the 1D position of the first code of the latest item opened by `begin` at or before
    each position (-1 where none is open). With caches, carried across calls per row."""
    opened = torch.where(ids == begin, positions + 1, -1).cummax(dim=1).values  # (B, T)
    if caches is None:
        return opened
    state = caches.item_start
    if name not in state:
        total = caches[0].k.shape[0]
        state[name] = torch.full((total,), -1, dtype=torch.long, device=ids.device)
    rows = _cache_rows(caches, ids.shape[0])
    if start == 0:  # a new sequence in these rows: nothing carried over from their previous one
        state[name][rows] = -1
    carried = state[name][rows].unsqueeze(1)  # (B, 1)
    opened = torch.where(opened >= 0, opened, carried)
    state[name][rows] = opened[:, -1]
    return opened


def mrope_positions(ids: torch.Tensor, positions: torch.Tensor, vocab: Vocabulary, caches=None,
                    start: int = 0) -> torch.Tensor:
    """1D positions (B, T) -> (time, row, column) positions (B, T, 3) for every token."""
    pos3 = positions.unsqueeze(-1).repeat(1, 1, 3)
    for spec in vocab.modalities:
        if not spec.grid:
            continue
        first = item_starts(ids, positions, vocab.begin(spec.name), spec.name, caches, start)
        slot = positions - first  # index of the code inside its item
        use = vocab.is_modality(spec.name, ids) & (first >= 0) & (slot >= 0) & (slot < math.prod(spec.grid))
        rows, cols = spec.grid[-2:]
        frame = slot // (rows * cols)
        at = torch.stack([first + frame, first + (slot % (rows * cols)) // cols, first + slot % cols], dim=-1)
        pos3 = torch.where(use.unsqueeze(-1), at, pos3)
    return pos3


def rope_at(table: torch.Tensor, positions: torch.Tensor, sections: tuple[int, ...] = ()) -> torch.Tensor:
    """A RoPE table (L, hd/2) at positions (B, T) -> (B, T, hd/2); at (B, T, 3) positions, frequencies
    [0, s0) turn with time, the next s1 with the row, the last s2 with the column."""
    if positions.dim() == 2:
        return table[positions]
    parts, lo = [], 0
    for axis, n in enumerate(sections):
        parts.append(table[positions[..., axis], lo : lo + n])
        lo += n
    return torch.cat(parts, dim=-1)
