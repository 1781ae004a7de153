"""The unified vocabulary: one id space for every modality, laid out in one place.

Like Chameleon, image codes are ordinary token ids that follow the text ids, so one transformer
reads and writes both. The layout is

    [0, n_text)                       text BPE ids
    [n_text, n_text + len(SPECIALS))  special tokens (<pad>, <bos>, <eos>, <boi>, <eoi>)
    [image_start, size)               image codes, code c  ->  id image_start + c

Image codes may be *factorised* (code = shape * n_colour + colour); `image_factors` records the
factor sizes so the model can embed and predict each factor separately.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

SPECIALS = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>")

TEXT, IMAGE = 0, 1  # modality ids; specials count as text (the text head predicts them)
MODALITY_NAMES = ("text", "image")


@dataclass(frozen=True)
class Vocabulary:
    n_text: int
    image_codes: int
    image_factors: tuple[int, ...]
    tokens_per_image: int
    # FSQ levels of each code factor, e.g. ((8, 5, 5), (4, 4)): enough to turn a code back into the
    # tokenizer's continuous latent vector (`code_latents`), which continuous-input variants embed.
    image_levels: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        prod = 1
        for f in self.image_factors:
            prod *= f
        if prod != self.image_codes:
            raise ValueError(f"image factors {self.image_factors} multiply to {prod}, not {self.image_codes}")
        for f, levels in zip(self.image_factors, self.image_levels):
            if math.prod(levels) != f:
                raise ValueError(f"FSQ levels {levels} do not give {f} codes")

    # Special ids
    def special(self, name: str) -> int:
        return self.n_text + SPECIALS.index(name)

    @property
    def pad(self) -> int:
        return self.special("<pad>")

    @property
    def bos(self) -> int:
        return self.special("<bos>")

    @property
    def eos(self) -> int:
        return self.special("<eos>")

    @property
    def boi(self) -> int:
        return self.special("<boi>")

    @property
    def eoi(self) -> int:
        return self.special("<eoi>")

    @property
    def image_start(self) -> int:
        return self.n_text + len(SPECIALS)

    @property
    def size(self) -> int:
        return self.image_start + self.image_codes

    def image_ids(self, codes: torch.Tensor) -> torch.Tensor:
        return codes + self.image_start

    def image_codes_of(self, ids: torch.Tensor) -> torch.Tensor:
        return ids - self.image_start

    def modality(self, ids: torch.Tensor) -> torch.Tensor:
        """Modality id per token: IMAGE for image codes, TEXT for everything else."""
        return (ids >= self.image_start).long()

    @property
    def image_latent_dim(self) -> int:
        return sum(len(levels) for levels in self.image_levels)

    def code_latents(self) -> torch.Tensor:
        """(image_codes, image_latent_dim) float table: the tokenizer's quantised latent of every code,
        each channel in [-1, 1]. Mirrors `FSQ.values`: mixed radix, first channel least significant."""
        if not self.image_levels:
            raise ValueError("this vocabulary does not record the image tokenizer's FSQ levels")
        codes = torch.arange(self.image_codes)
        parts = []
        for factor_codes, levels in zip(_split(codes, self.image_factors), self.image_levels):
            for level in levels:
                parts.append((factor_codes % level).float() * 2 / (level - 1) - 1)
                factor_codes = factor_codes // level
        return torch.stack(parts, dim=1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        return cls(
            n_text=int(d["n_text"]),
            image_codes=int(d["image_codes"]),
            image_factors=tuple(int(x) for x in d["image_factors"]),
            tokens_per_image=int(d["tokens_per_image"]),
            image_levels=tuple(tuple(int(x) for x in lv) for lv in d.get("image_levels", ())),
        )


def _split(codes: torch.Tensor, factors: tuple[int, ...]) -> list[torch.Tensor]:
    """Joint code -> factor codes, most significant first (code = f0 * n1 + f1 for two factors)."""
    parts = []
    for f in reversed(factors):
        parts.append(codes % f)
        codes = codes // f
    return parts[::-1]
