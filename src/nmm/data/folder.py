"""Training data from a user's own folder: images plus a ``captions.jsonl`` index.

Layout::

    my_data/
        captions.jsonl        one JSON object per line: {"image": "cats/01.png", "caption": "a cat"}
        cats/01.png           image paths are relative to the folder

Everything is read and checked when the source is built, so a bad line or unreadable image is
reported at once, naming the file and line, instead of hours into a training run. The images are
kept in memory at the model's resolution (a 32x32 RGB image is 3 KB, so 100k images fit in
300 MB); big photos are then decoded and resized once, not on every epoch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from nmm.errors import InputError

CAPTIONS_FILE = "captions.jsonl"


class ImageFolderSource:
    """(image, caption) pairs from a folder with a ``captions.jsonl`` file."""

    def __init__(self, root: str | Path, image_size: int = 32):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.root = Path(root)
        self.image_size = image_size
        if not self.root.is_dir():
            raise InputError(f"image folder not found: {self.root}")
        entries = _read_captions(self.root / CAPTIONS_FILE)
        self.image_paths = [self.root / image for image, _ in entries]
        self._captions = [caption for _, caption in entries]
        self._images = np.stack([load_image(path, image_size) for path in self.image_paths])

    def __len__(self) -> int:
        return len(self._captions)

    def __getitem__(self, i: int) -> tuple[np.ndarray, str]:
        """The i-th image as (image_size, image_size, 3) uint8, and its caption."""
        # A copy, so a caller editing the image in place cannot corrupt the stored one.
        return self._images[i].copy(), self._captions[i]

    def captions(self) -> list[str]:
        """All captions in file order, e.g. to train the text tokenizer."""
        return list(self._captions)

    def split(self, heldout_fraction: float = 0.1, seed: int = 0) -> tuple[list[int], list[int]]:
        """Deterministically split indices into (train, heldout), each sorted."""
        if not 0 <= heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
        n = len(self)
        n_heldout = round(n * heldout_fraction)
        if heldout_fraction > 0 and n >= 2:
            # Keep at least one image on each side, so evaluation always has something to score.
            n_heldout = min(max(n_heldout, 1), n - 1)
        order = np.random.default_rng(seed).permutation(n)
        return sorted(order[n_heldout:].tolist()), sorted(order[:n_heldout].tolist())


def write_example_folder(
    root: str | Path, images: list[np.ndarray], captions: list[str]
) -> Path:
    """Write `images` as PNGs under ``root/images/`` with a matching ``captions.jsonl``."""
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, caption) in enumerate(zip(images, captions)):
        relative = f"images/{i:05d}.png"
        Image.fromarray(np.asarray(image)).save(root / relative)
        lines.append(json.dumps({"image": relative, "caption": caption}))
    (root / CAPTIONS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _read_captions(path: Path) -> list[tuple[str, str]]:
    """Parse captions.jsonl into (relative image path, caption) pairs, naming any bad line."""
    if not path.is_file():
        raise InputError(f"captions file not found: {path}")
    try:
        # utf-8-sig: editors on Windows like to start files with a byte-order mark.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from e

    entries = []
    # split("\n"), not splitlines(): the latter also splits on characters valid inside JSON strings.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: invalid JSON ({e.msg})") from e
        if not isinstance(record, dict):
            raise InputError(f'{where}: expected an object like {{"image": ..., "caption": ...}}')
        for field in ("image", "caption"):
            value = record.get(field)
            if not isinstance(value, str) or not value.strip():
                raise InputError(f'{where}: missing or empty "{field}" field')
        entries.append((record["image"], record["caption"]))
    if not entries:
        raise InputError(f"{path} lists no images")
    return entries


def load_image(path: Path, size: int) -> np.ndarray:
    """Read any Pillow-readable image as (size, size, 3) uint8; InputError naming the file if it can't."""
    if not path.is_file():
        raise InputError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            # Phone photos store their rotation in EXIF; apply it so captions match what users see.
            image = ImageOps.exif_transpose(image).convert("RGB")
            if image.size != (size, size):
                # A plain resize rather than a crop: cropping could cut away what the caption
                # describes ("a circle at the left"), squashing only distorts it a little.
                # An exact multiple (e.g. a 256 px PNG nmm wrote from a 32 px image) averages whole
                # blocks, which gives the original pixels back; anything else gets Lanczos.
                exact = image.size[0] % size == 0 and image.size[1] % size == 0
                image = image.resize((size, size), Image.Resampling.BOX if exact else Image.Resampling.LANCZOS)
            return np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image {path}: {e}") from e
