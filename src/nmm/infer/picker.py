"""Hidden states -> next ids: every row through the head its decoding phase needs.

Shared by `Engine.generate` and the `Scheduler`. A `Plan` (host side, rebuilt only when a row's phase
or the batch changes) groups the rows: rows in text run the text head alone (codes are never allowed
there), rows inside a fixed-length item (an image) that modality's code head alone, rows whose next
token is forced (`<eoi>` after the last code) no head at all. So a step computes only the logits its
rows can use. Rows inside a variable-length item may take a code or the item's end token, which the
text head scores: they take all logits (`model.logits`) and their phase's mask.

With a factorised code head and plain greedy or temperature sampling (no top-k / top-p), a code is
chosen factor by factor: its logit is the sum of the factors' logits, so the joint softmax is the
product of the factors' softmaxes (and CFG mixing and temperature, being linear, apply per factor): the
argmax is the factors' argmaxes and a sample is drawn factor by factor from the row's one uniform
(`inverse_cdf_residual`), e.g. 200 + 16 logits instead of 3,200 for an image. Top-k and top-p need the
joint ranking, so they keep the joint grid. In bf16 / fp16 the joint grid is summed in low precision,
whose rounding can break near-ties differently, so those keep the grid too, as does a one-factor head.

Classifier-free guidance pairs each guided row with an unconditional companion row (`guided_rows`):
both go through the code head and their logits are mixed, uncond + scale * (cond - uncond), only at
code positions (`cfg_mix`); text positions read the conditional row alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nmm.infer.decoding import TEXT, Decoder, codes_phase
from nmm.infer.sampling import (
    SamplingConfig,
    SamplingRows,
    inverse_cdf_residual,
    penalize,
    sample_rows,
)
from nmm.modalities.base import join_codes
from nmm.model.heads import ImageHead


@dataclass
class Row:
    """One conditional row, as the plan needs it."""

    row: int  # its row in the batch
    phase: int  # its decoding phase (nmm.infer.decoding)
    sampling: SamplingConfig
    allow: frozenset = frozenset()  # modalities it may open (text phase)
    eos: bool = True  # may it end with <eos> now
    companion: int = -1  # its unconditional row under CFG, else -1


@dataclass
class _CodeGroup:
    name: str  # the modality
    factored: bool  # factor by factor (else the joint grid)
    cond: slice | torch.Tensor  # the group's rows
    both: slice | torch.Tensor  # its rows, then each one's unconditional row (itself when unguided)
    scale: torch.Tensor | None  # (k, 1) or () CFG scales; None: no row of the group is guided
    sampled: bool
    temperature: float | None = None  # the one temperature (> 0) of a group whose rows all sample with it


@dataclass
class _FullGroup:
    cond: slice | torch.Tensor
    both: slice | torch.Tensor
    scale: torch.Tensor | None
    bias: torch.Tensor  # (k, V) the rows' masks
    sampled: bool


@dataclass
class Plan:
    n: int  # rows the step returns ids for
    text: tuple | None = None  # (rows, bias (S,) or (k, S), sampled, penalized)
    codes: list[_CodeGroup] = field(default_factory=list)
    full: _FullGroup | None = None  # rows inside a variable-length item: all logits + mask
    forced: list[tuple[torch.Tensor | slice, int]] = field(default_factory=list)  # (rows, the id they must take)
    companions: tuple[torch.Tensor, torch.Tensor] | None = None  # (uncond rows, their cond rows): fed the same id
    sampled: bool = False  # any row samples (the step needs its uniforms)
    penalized: bool = False  # a text row has a repetition penalty
    all_forced: int | None = None  # every row takes this one id: no head needed

    @property
    def fused(self) -> str | None:
        """'text' / a modality's name when one greedy group covers rows 0..n-1 (and, for codes, their CFG rows
        n..2n-1 after them) and no other group runs: then a whole compiled step can pick it."""
        if self.sampled or self.forced or self.full is not None or self.companions is not None:
            return None
        if self.text is not None and not self.codes and _is_rows(self.text[0], 0, self.n) and not self.penalized:
            return "text"
        if self.text is None and len(self.codes) == 1:
            g = self.codes[0]
            if g.factored and _is_rows(g.cond, 0, self.n) and _is_rows(g.both, 0, self.n if g.scale is None else 2 * self.n):
                return g.name
        return None


def _is_rows(index, start: int, stop: int) -> bool:
    return isinstance(index, slice) and index.start == start and index.stop == stop


def rows_index(rows: list[int], device) -> slice | torch.Tensor:
    """Row numbers -> a slice when they are consecutive (a view, no gather), else an index tensor."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, dtype=torch.long, device=device)


def guided_rows(cond: list[int], companions: list[int], scales: list[float], device):
    """The CFG pairing: conditional rows and their unconditional companions (-1: unguided) -> (the rows to
    run: the conditional ones, then each one's companion or itself; the scales: (k, 1), 1 where unguided, or
    one () scale when all rows share it), or (None, None) when no row is guided (no mixing)."""
    if all(c < 0 for c in companions):
        return None, None
    uncond = [c if c >= 0 else r for r, c in zip(cond, companions)]
    per_row = [s if c >= 0 else 1.0 for s, c in zip(scales, companions)]
    if len(set(per_row)) == 1:  # one scale for all: a scalar (the cheaper broadcast)
        return rows_index(cond + uncond, device), torch.tensor(float(per_row[0]), device=device)
    return rows_index(cond + uncond, device), torch.tensor([[s] for s in per_row], device=device)


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance on logits: uncond + scale * (cond - uncond) (scale 1 gives cond)."""
    return uncond + scale * (cond - uncond)


def code_interfaces(model) -> dict:
    """The model's modalities that write codes (have a code head), by name, in vocabulary order."""
    interfaces = getattr(model, "modalities", None)
    if interfaces is None:  # a model with the image interface alone
        interfaces = {"image": model.images} if getattr(model, "images", None) is not None else {}
    return {name: i for name, i in interfaces.items() if i is not None and i.emits_codes}


class Picker:
    """The heads of one model, per phase: `plan` groups rows, `pick` turns hidden states into ids.
    `table(allow, eos)` gives the (phases, V) additive masks (default: the decoder's)."""

    def __init__(self, model, decoder: Decoder, table=None):
        self.model, self.decoder, self.vocab = model, decoder, decoder.vocab
        self.device = decoder.device
        self.text_size = self.vocab.text_size  # outputs of the text head: text ids and specials
        self.table = table or decoder.table
        dtype = next(model.parameters()).dtype
        self.interfaces = {n: i for n, i in code_interfaces(model).items() if n in decoder.emits}
        self.code_factors: dict[str, tuple[int, ...] | None] = {}  # None: the joint grid
        self._phases: dict[int, str] = {}  # codes phase -> modality
        for name, interface in self.interfaces.items():
            head = getattr(interface, "head", None)
            factored = isinstance(head, ImageHead) and len(head.factors) > 1 and dtype == torch.float32
            self.code_factors[name] = tuple(head.factors) if factored else None
            self._phases[codes_phase(self.vocab.index(name))] = name

    @property
    def factors(self) -> tuple[int, ...] | None:
        """The image head's factors when image codes are chosen factor by factor, else None."""
        return self.code_factors.get("image")

    @factors.setter
    def factors(self, value: tuple[int, ...] | None) -> None:
        self.code_factors["image"] = value

    # ---- heads ----------------------------------------------------------------------------------
    def text_greedy(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """(k, D) hidden, (S,) or (k, S) text bias -> (k,) argmax over the text head only."""
        return (self.model.text_head(h).float() + bias).argmax(-1)

    def factor_logits(self, h: torch.Tensor, n: int, scale, name: str = "image") -> list[torch.Tensor]:
        """Per-factor code logits of rows h[:n], CFG-mixed against rows h[n:] when `scale` is given (the
        mixing is linear, so summing mixed factor logits gives the mixed joint logits). scale: () or (n, 1)."""
        parts = [p.float() for p in self.interfaces[name].head.factor_logits(h)]
        if scale is None:
            return parts
        return [cfg_mix(p[:n], p[n:], scale) for p in parts]

    def combine_factors(self, indices: list[torch.Tensor], name: str = "image") -> torch.Tensor:
        """Per-factor indices (most significant first) -> vocabulary ids of the codes."""
        return self.vocab.ids(name, join_codes(indices, self.code_factors[name]))

    def image_greedy(self, h: torch.Tensor, n: int, scale, name: str = "image") -> torch.Tensor:
        """The joint argmax over a modality's codes, as the factors' argmaxes."""
        return self.greedy_codes(name)(h, n, scale)

    def greedy_codes(self, name: str):
        """`image_greedy` of modality `name` as a function (h, n, scale) -> ids that closes over the head and its
        factors: what a compiled step should see (constants, not dictionaries to guard). The factors are joined
        as `join_codes` does, written out: its leading multiply would be one more graph input per step."""
        head, factors, vocab = self.interfaces[name].head, self.code_factors[name], self.vocab

        def greedy(h: torch.Tensor, n: int, scale) -> torch.Tensor:
            parts = [p.float() for p in head.factor_logits(h)]
            if scale is not None:
                parts = [cfg_mix(p[:n], p[n:], scale) for p in parts]
            code = parts[0].argmax(-1)
            for f, p in zip(factors[1:], parts[1:]):
                code = code * f + p.argmax(-1)
            return vocab.ids(name, code)

        return greedy

    # ---- plan -----------------------------------------------------------------------------------
    def plan(self, rows: list[Row], n: int, companions: bool = False) -> Plan:
        """Group `rows` (conditional rows; the step returns ids for rows 0..n-1) by the head they need.
        `companions`: also give each CFG companion row its request's id (the Scheduler feeds them that)."""
        dev, dec = self.device, self.decoder
        text, codes, full, forced = [], {}, [], {}
        for r in rows:
            if r.phase == TEXT:
                text.append(r)
            elif (token := dec.forced(r.phase)) is not None:
                forced.setdefault(token, []).append(r.row)
            elif (name := self._phases.get(r.phase)) is None:
                raise ValueError(f"this model cannot write {dec.name(r.phase)} codes")
            elif dec.specs[self.vocab.index(name) - 1].fixed_length:
                factored = self.code_factors[name] is not None and not r.sampling.truncated
                codes.setdefault((name, factored), []).append(r)
            else:
                full.append(r)
        plan = Plan(n, sampled=any(not r.sampling.greedy for r in rows),
                    penalized=any(r.sampling.repetition_penalty != 1.0 for r in text))
        if text:
            keys = [(r.allow, r.eos) for r in text]
            S = self.text_size
            if len(set(keys)) == 1:
                bias = self.table(*keys[0])[TEXT, :S]
            else:
                tables = {key: self.table(*key)[TEXT, :S] for key in set(keys)}
                bias = torch.stack([tables[key] for key in keys])
            plan.text = (rows_index([r.row for r in text], dev), bias, any(not r.sampling.greedy for r in text),
                         plan.penalized)
        for (name, factored), group in codes.items():
            index, both, scale = self._pairs(group)
            temperatures = {r.sampling.temperature for r in group}
            one = temperatures.pop() if len(temperatures) == 1 else 0.0
            plan.codes.append(_CodeGroup(name, factored, index, both, scale, any(not r.sampling.greedy for r in group),
                                         float(one) if one > 0 else None))
        if full:
            index, both, scale = self._pairs(full)
            bias = torch.stack([self.table(r.allow, r.eos)[r.phase] for r in full])
            plan.full = _FullGroup(index, both, scale, bias, any(not r.sampling.greedy for r in full))
        plan.forced = [(rows_index(ids, dev), token) for token, ids in forced.items()]
        if len(forced) == 1 and not text and not codes and not full:
            plan.all_forced = next(iter(forced))
        if companions:
            pairs = [(r.companion, r.row) for r in rows if r.companion >= 0]
            if pairs:
                plan.companions = (torch.tensor([c for c, _ in pairs], device=dev),
                                   torch.tensor([r for _, r in pairs], device=dev))
        return plan

    def _pairs(self, group: list[Row]):
        cond = [r.row for r in group]
        both, scale = guided_rows(cond, [r.companion for r in group], [r.sampling.cfg_scale for r in group],
                                  self.device)
        index = rows_index(cond, self.device)
        return index, index if both is None else both, scale

    # ---- pick -----------------------------------------------------------------------------------
    def pick(self, h: torch.Tensor, plan: Plan, settings: SamplingRows | None, u: torch.Tensor | None) -> torch.Tensor:
        """Hidden states h (>= n, D) -> (n,) next ids, each group through its head. `settings`: the rows'
        sampling settings; `u` (>= n,): each row's uniform for this step (needed when `plan.sampled`)."""
        n, s = plan.n, settings
        nxt = None
        if plan.text is not None:
            sel, bias, sampled, penalized = plan.text
            logits = self.model.text_head(h[sel]).float() + bias
            if penalized:  # on the text ids each row generated so far (CTRL)
                logits = penalize(logits, s.seen[sel, : self.text_size], s.penalty[sel])
            if sampled:
                tok = sample_rows(logits, s.temperature[sel], s.top_k[sel], s.top_p[sel], u[sel])
            else:
                tok = logits.argmax(-1)
            if _is_rows(sel, 0, n):
                nxt = tok
            else:
                nxt = torch.empty(n, dtype=torch.long, device=h.device)
                nxt[sel] = tok
        if nxt is None:
            nxt = torch.empty(n, dtype=torch.long, device=h.device)
        for g in plan.codes:
            hh = h[g.both]
            k = hh.shape[0] if g.scale is None else hh.shape[0] // 2
            if g.factored:
                parts = self.factor_logits(hh, k, g.scale, g.name)
                if not g.sampled:
                    tok = self.combine_factors([x.argmax(-1) for x in parts], g.name)
                elif g.temperature is not None:  # every row samples, at one temperature
                    r, picks, last = u[g.cond], [], len(parts) - 1
                    for j, x in enumerate(parts):
                        i, r = inverse_cdf_residual((x / g.temperature).softmax(-1), r, residual=j < last)
                        picks.append(i)
                    tok = self.combine_factors(picks, g.name)
                else:
                    temperature = s.temperature[g.cond]
                    hot = temperature > 0
                    r, picks, last = u[g.cond], [], len(parts) - 1
                    for j, x in enumerate(parts):
                        i, r = inverse_cdf_residual((x / torch.where(hot, temperature, 1.0).unsqueeze(1)).softmax(-1), r,
                                                    residual=j < last)
                        picks.append(torch.where(hot, i, x.argmax(-1)))
                    tok = self.combine_factors(picks, g.name)
            else:
                logits = self.interfaces[g.name].logits(hh).float()
                if g.scale is not None:
                    logits = cfg_mix(logits[:k], logits[k:], g.scale)
                if g.sampled:
                    code = sample_rows(logits, s.temperature[g.cond], s.top_k[g.cond], s.top_p[g.cond], u[g.cond])
                else:
                    code = logits.argmax(-1)
                tok = self.vocab.ids(g.name, code)
            nxt[g.cond] = tok
        if plan.full is not None:
            g = plan.full
            hh = h[g.both]
            logits = self.model.logits(hh).float()
            if g.scale is not None:  # guidance on the codes; the end token (a special) reads the conditional row
                k = hh.shape[0] // 2
                mixed = cfg_mix(logits[:k], logits[k:], g.scale)
                logits = torch.cat([logits[:k, : self.text_size], mixed[:, self.text_size :]], dim=1)
            logits = logits + g.bias
            if g.sampled:
                nxt[g.cond] = sample_rows(logits, s.temperature[g.cond], s.top_k[g.cond], s.top_p[g.cond], u[g.cond])
            else:
                nxt[g.cond] = logits.argmax(-1)
        for sel, token in plan.forced:
            nxt[sel] = token
        if plan.companions is not None:
            companion, cond = plan.companions
            nxt[companion] = nxt[cond]  # the unconditional row is fed the request's token
        return nxt
