"""The decoding state machine: what a sequence may emit next, for every modality of the vocabulary.

Built from `vocab.modalities` alone (no model): per sequence the state is *text*, or *inside an item*
of modality m (with the codes still to come when m's items have a fixed length). So an answer that
interleaves text and items is always well formed:

    text          text ids, `<eos>` (unless suppressed: `ignore_eos`, `min_new_tokens`) and the begin
                  token of each modality the model can emit and the request allows (`<boi>`, ...)
    begin(m)  ->  m's codes only; a variable-length item (`tokens_per_item` None) may also end
                  itself by sampling `end(m)`
    a fixed-length item, after its `tokens_per_item` codes  ->  `end(m)` is forced (no head needed)
    end(m)    ->  text again

A state is a small host-side object (`SeqState`); its `phase` names what may come next and indexes
the rows of the allowed-token table: `TEXT` (0), then for the k-th modality (1-based) `2k - 1` (its
codes) and `2k` (its end token, forced). `Decoder.table(allow, eos)` is that table as additive
0 / -inf rows (x + 0 == x exactly), built once per setting; `Decoder.advance(state, token)` moves a
state on by one token and says what happened (`CHANGED`, `CLOSED`, `EOS` flags), so the generation
loops replan only when a phase changes. `Engine.generate` and the `Scheduler` both run this machine.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from nmm.modalities.vocab import Vocabulary

NEG_INF = float("-inf")
TEXT = 0  # the text phase; modality k (1-based) has phases codes_phase(k) = 2k - 1 and end_phase(k) = 2k
CHANGED, CLOSED, EOS = 1, 2, 4  # what `Decoder.advance` reports (bit flags)


def codes_phase(k: int) -> int:
    return 2 * k - 1


def end_phase(k: int) -> int:
    return 2 * k


class SeqState:
    """One sequence's place in the state machine: its `phase`, and the codes still to come in a
    fixed-length item (-1 inside a variable-length one, 0 in text)."""

    __slots__ = ("phase", "remaining")

    def __init__(self, phase: int = TEXT, remaining: int = 0):
        self.phase, self.remaining = phase, remaining

    @property
    def modality(self) -> int:
        """0 in text, else the (1-based) index of the modality whose item is open."""
        return (self.phase + 1) >> 1

    def __repr__(self) -> str:
        return f"SeqState(phase={self.phase}, remaining={self.remaining})"


class CannotGenerate(ValueError):
    """A prompt opens an item (ends in its begin token) of a modality the model cannot write."""


class Decoder:
    """The state machine over `vocab`. `emits`: the modalities whose codes the model can write (default all):
    the others' begin tokens are never allowed. Model-independent: it deals in ids, phases and masks."""

    def __init__(self, vocab: Vocabulary, emits: Iterable[str] | None = None, device: torch.device | str = "cpu"):
        self.vocab, self.device = vocab, torch.device(device)
        self.specs = vocab.modalities
        names = [m.name for m in self.specs]
        emits = names if emits is None else list(emits)
        for name in emits:
            vocab.spec(name)  # KeyError for a modality the vocabulary does not have
        self.emits = tuple(n for n in names if n in emits)  # in vocabulary order
        self.n_phases = 1 + 2 * len(self.specs)
        self.eos = vocab.eos
        self._begin = {vocab.begin(m.name): k for k, m in enumerate(self.specs, 1)}  # begin id -> modality index
        self._end = [-1] + [vocab.end(m.name) for m in self.specs]  # modality index -> end id
        self._length = [0] + [-1 if m.tokens_per_item is None else m.tokens_per_item for m in self.specs]
        self._ranges = [vocab.range(m.name) for m in self.specs]
        self._tables: dict[tuple[frozenset, bool], torch.Tensor] = {}

    # ---- phases ---------------------------------------------------------------------------------
    def name(self, phase: int) -> str:
        """The modality a phase belongs to ("text" for TEXT)."""
        return self.vocab.names[(phase + 1) >> 1]

    def forced(self, phase: int) -> int | None:
        """The one id a phase allows (an end token after a fixed-length item's codes), or None."""
        return self._end[phase >> 1] if phase and phase % 2 == 0 else None

    def allow_set(self, allow: bool | Iterable[str]) -> frozenset[str]:
        """The modalities a request may open, of those the model can emit: True = all, False = none, or names."""
        if isinstance(allow, str):
            allow = (allow,)
        elif not isinstance(allow, Iterable):  # a bool (or None)
            return frozenset(self.emits) if allow else frozenset()
        return frozenset(n for n in allow if n in self.emits)

    # ---- allowed ids ----------------------------------------------------------------------------
    def allowed(self, allow: bool | Iterable[str] = True, eos: bool = True) -> torch.Tensor:
        """(n_phases, V) bool: the ids each phase allows, for a request that may open the modalities in
        `allow` (intersected with what the model emits) and may (`eos`) end with `<eos>`."""
        v, allow = self.vocab, self.allow_set(allow)
        out = torch.zeros(self.n_phases, v.size, dtype=torch.bool)
        out[TEXT, : v.n_text] = True
        out[TEXT, v.eos] = eos
        for k, m in enumerate(self.specs, 1):
            if m.name in allow:
                out[TEXT, v.begin(m.name)] = True
            lo, hi = self._ranges[k - 1]
            out[codes_phase(k), lo:hi] = True
            if m.tokens_per_item is None:  # a variable-length item ends when the model samples its end
                out[codes_phase(k), v.end(m.name)] = True
            out[end_phase(k), v.end(m.name)] = True
        return out.to(self.device)

    def table(self, allow: bool | Iterable[str] = True, eos: bool = True) -> torch.Tensor:
        """`allowed` as additive float rows (0 allowed, -inf not), cached per setting."""
        key = (self.allow_set(allow), bool(eos))
        if key not in self._tables:
            allowed = self.allowed(key[0], key[1])
            self._tables[key] = torch.zeros(allowed.shape, device=self.device).masked_fill_(~allowed, NEG_INF)
        return self._tables[key]

    def mask(self, logits: torch.Tensor, states: Sequence[SeqState], allow: bool | Iterable[str] = True,
             eos: bool = True) -> torch.Tensor:
        """(B, V) logits -> the same with every id the rows' states disallow at -inf."""
        phases = torch.tensor([s.phase for s in states], device=logits.device)
        return logits + self.table(allow, eos).to(logits.device)[phases]

    # ---- states ---------------------------------------------------------------------------------
    def start(self, prompt: Sequence[int]) -> SeqState:
        """The state after a prompt: text, or inside the item the prompt opens (it ends in a begin token,
        perhaps followed by some of the item's codes)."""
        if not prompt:
            return SeqState()
        k = self._begin.get(int(prompt[-1]))
        if k is not None:
            return self._open(k)
        # Trailing codes of one modality, right after its begin token: the item is still open.
        for k, (lo, hi) in enumerate(self._ranges, 1):
            if lo <= int(prompt[-1]) < hi:
                i = len(prompt) - 1
                while i >= 0 and lo <= int(prompt[i]) < hi:
                    i -= 1
                if i < 0 or self._begin.get(int(prompt[i])) != k:
                    return SeqState()
                state, count = self._open(k), len(prompt) - 1 - i
                if state.remaining < 0:
                    return state
                if count >= state.remaining:
                    return SeqState(end_phase(k), 0) if count == state.remaining else SeqState()
                state.remaining -= count
                return state
        return SeqState()

    def opened(self, state: SeqState) -> str | None:
        """The modality of the item a state is inside, None in text."""
        return None if state.phase == TEXT else self.name(state.phase)

    def check_prompt(self, prompt: Sequence[int], what: str = "this model", hint: str = "") -> SeqState:
        """`start`, refusing (CannotGenerate) a prompt that opens an item of a modality the model cannot write."""
        state = self.start(prompt)
        name = self.opened(state)
        if name is not None and name not in self.emits:
            raise CannotGenerate(f"{what} cannot generate {name} token by token: it has no head over {name} "
                                 f"codes{hint}")
        return state

    def _open(self, k: int) -> SeqState:
        n = self._length[k]
        return SeqState(codes_phase(k), n)

    def advance(self, state: SeqState, token: int) -> int:
        """Move `state` on by the token just emitted; returns flags: CHANGED (the phase changed: an item
        opened, its last fixed-length code came, or it closed), CLOSED (this was an item's end token),
        EOS (this was `<eos>`, in text)."""
        phase = state.phase
        if phase == TEXT:
            k = self._begin.get(token)
            if k is None:
                return EOS if token == self.eos else 0
            state.phase, state.remaining = codes_phase(k), self._length[k]
            return CHANGED
        if phase % 2 == 0 or token == self._end[(phase + 1) >> 1]:  # the end token: forced, or sampled
            state.phase, state.remaining = TEXT, 0
            return CHANGED | CLOSED
        if state.remaining > 0:
            state.remaining -= 1
            if state.remaining == 0:
                state.phase = phase + 1
                return CHANGED
        return 0
