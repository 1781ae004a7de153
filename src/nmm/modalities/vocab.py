"""The unified vocabulary: one id space for every modality, laid out in one place.

Like Chameleon, the codes of every modality are ordinary token ids that follow the text ids, so one
transformer reads and writes them all. The layout, built from the modality specs in order, is

    [0, n_text)                         text BPE ids
    [n_text, text_size)                 specials: <pad> <bos> <eos>, then each modality's begin, end
    [start(m), start(m) + codes(m))     the codes of modality m, one range per modality, in spec order

For text + image this is exactly the layout nmm always had (`<pad> <bos> <eos> <boi> <eoi>`, then
the image codes), so runs saved before modalities were plugins load unchanged. `ids(name, codes)`
and `codes(name, ids)` are the only way across the boundary; `modality_of(ids)` labels every
position (0 = text or a special, k = the k-th modality) in one vectorised call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nmm.modalities.base import TEXT, ModalitySpec, split_codes

BASE_SPECIALS = ("<pad>", "<bos>", "<eos>")
LAYOUT_VERSION = 2  # 1: the text + image layout of nmm 0.1 (vocab.json without "layout_version")


class VocabularyError(ValueError):
    """A vocab.json that does not describe a layout this version of nmm can read."""


@dataclass(frozen=True)
class Vocabulary:
    n_text: int
    modalities: tuple[ModalitySpec, ...] = ()

    def __post_init__(self):
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate modality names in {names}")
        specials = BASE_SPECIALS + tuple(tok for m in self.modalities for tok in (m.begin, m.end))
        if len(set(specials)) != len(specials):
            raise ValueError(f"duplicate special tokens in {specials}")
        # The derived layout, computed once. Plain attributes, not cached_property: its lock would break
        # a torch.compile graph that calls `modality_of` / `is_modality`.
        starts, at = {}, self.n_text + len(specials)
        for m in self.modalities:
            starts[m.name] = at
            at += m.codes
        object.__setattr__(self, "specials", specials)
        object.__setattr__(self, "_starts", starts)
        object.__setattr__(self, "_boundaries", torch.tensor(list(starts.values()), dtype=torch.long))

    # ---- layout ---------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        """Modality names in id order, text first: `names[modality_of(ids)]` names a position."""
        return (TEXT, *(m.name for m in self.modalities))

    @property
    def text_size(self) -> int:
        """Ids the text head predicts: text ids and specials (everything before the first modality)."""
        return self.n_text + len(self.specials)

    @property
    def size(self) -> int:
        return self.text_size + sum(m.codes for m in self.modalities)

    def spec(self, name: str) -> ModalitySpec:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(f"this vocabulary has no modality {name!r} (it has {', '.join(self.names)})")

    def has(self, name: str) -> bool:
        return any(m.name == name for m in self.modalities)

    def start(self, name: str) -> int:
        """First id of a modality's code range."""
        self.spec(name)
        return self._starts[name]

    def range(self, name: str) -> tuple[int, int]:
        start = self.start(name)
        return start, start + self.spec(name).codes

    def index(self, name: str) -> int:
        """The label `modality_of` gives this modality's codes (0 is text)."""
        return self.names.index(name)

    # ---- ids <-> codes ---------------------------------------------------------------------
    def ids(self, name: str, codes):
        """Codes of modality `name` (tensor, array or int) -> vocabulary ids."""
        return codes + self.start(name)

    def codes(self, name: str, ids):
        """Vocabulary ids of modality `name` -> its codes (no range check: see `is_modality`)."""
        return ids - self.start(name)

    def is_modality(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        lo, hi = self.range(name)
        return (ids >= lo) & (ids < hi)

    def is_code(self, ids: torch.Tensor) -> torch.Tensor:
        """True where an id is the code of any (non-text) modality."""
        return ids >= self.text_size

    def modality_of(self, ids: torch.Tensor) -> torch.Tensor:
        """(…) ids -> (…) long modality label: 0 for text and specials, k for the k-th modality."""
        return torch.bucketize(ids, self._boundaries.to(ids.device), right=True)

    # ---- specials ------------------------------------------------------------------------
    def special(self, name: str) -> int:
        try:
            return self.n_text + self.specials.index(name)
        except ValueError:
            raise KeyError(f"no special token {name!r} (have {' '.join(self.specials)})") from None

    @property
    def pad(self) -> int:
        return self.special("<pad>")

    @property
    def bos(self) -> int:
        return self.special("<bos>")

    @property
    def eos(self) -> int:
        return self.special("<eos>")

    def begin(self, name: str) -> int:
        return self.special(self.spec(name).begin)

    def end(self, name: str) -> int:
        return self.special(self.spec(name).end)

    def begins(self) -> dict[int, str]:
        """begin-token id -> modality name: what the decoder's state machine looks up."""
        return {self.begin(m.name): m.name for m in self.modalities}

    # ---- the image modality, by its usual names -------------------------------------------
    # Text + image is every model nmm trains today; these read the image spec.
    @property
    def boi(self) -> int:
        return self.begin("image")

    @property
    def eoi(self) -> int:
        return self.end("image")

    @property
    def image_codes(self) -> int:
        return self.spec("image").codes if self.has("image") else 0

    @property
    def image_factors(self) -> tuple[int, ...]:
        return self.spec("image").code_factors

    @property
    def tokens_per_image(self) -> int:
        return self.spec("image").tokens_per_item

    @property
    def image_levels(self) -> tuple[tuple[int, ...], ...]:
        return self.spec("image").levels

    @property
    def image_latent_dim(self) -> int:
        return self.spec("image").latent_dim

    def code_latents(self, name: str = "image") -> torch.Tensor:
        """(codes, latent_dim) float table: the tokenizer's quantised latent of every code, each
        channel in [-1, 1]. Mirrors `FSQ.values`: mixed radix, first channel least significant."""
        spec = self.spec(name)
        if not spec.levels:
            raise ValueError(f"this vocabulary does not record the {name} tokenizer's FSQ levels")
        codes = torch.arange(spec.codes)
        parts = []
        for factor_codes, levels in zip(split_codes(codes, spec.code_factors), spec.levels):
            for level in levels:
                parts.append((factor_codes % level).float() * 2 / (level - 1) - 1)
                factor_codes = factor_codes // level
        return torch.stack(parts, dim=1)

    # ---- persistence ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"layout_version": LAYOUT_VERSION, "n_text": self.n_text, "specials": list(self.specials),
                "modalities": [m.to_dict() for m in self.modalities],
                "ranges": {m.name: list(self.range(m.name)) for m in self.modalities}, "size": self.size}

    @classmethod
    def from_dict(cls, d: dict) -> Vocabulary:
        version = d.get("layout_version", 1)
        if version == 1:  # nmm 0.1: text + one image range, same ids as the v2 layout built from it
            from nmm.modalities.image import image_spec

            return cls(int(d["n_text"]), (image_spec(
                int(d["image_codes"]), tuple(int(x) for x in d["image_factors"]), int(d["tokens_per_image"]),
                tuple(tuple(int(x) for x in lv) for lv in d.get("image_levels", ()))),))
        if version != LAYOUT_VERSION:
            raise VocabularyError(f"vocabulary layout version {version} is not one this nmm reads "
                                  f"(1 or {LAYOUT_VERSION}): the run was saved by a newer nmm")
        vocab = cls(int(d["n_text"]), tuple(ModalitySpec.from_dict(m) for m in d["modalities"]))
        if "specials" in d and list(d["specials"]) != list(vocab.specials):
            raise VocabularyError(f"vocab.json lists specials {d['specials']}, but its modalities give "
                                  f"{list(vocab.specials)}: every id after them would shift")
        return vocab

    def describe_difference(self, other: Vocabulary) -> str:
        """One line naming how two layouts differ (for the error when a run's files disagree)."""
        if self.n_text != other.n_text:
            return f"text ids {self.n_text} vs {other.n_text}"
        if self.names != other.names:
            return f"modalities {list(self.names)} vs {list(other.names)}"
        for a, b in zip(self.modalities, other.modalities):
            if a != b:
                diff = [k for k, v in a.to_dict().items() if b.to_dict()[k] != v]
                return f"modality {a.name!r} differs in {', '.join(diff)}"
        return "identical"
