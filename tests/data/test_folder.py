import json

import numpy as np
import pytest
from PIL import Image

from nmm.data.folder import ImageFolderSource, write_example_folder
from nmm.errors import InputError


def random_images(n: int, size: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def write_captions(root, lines: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")


def test_round_trip_through_write_example_folder(tmp_path):
    images = random_images(5)
    captions = ["a red circle", "a blue square", "a green triangle", "two circles", "nothing"]
    write_example_folder(tmp_path, images, captions)

    source = ImageFolderSource(tmp_path, image_size=32)
    assert len(source) == 5
    assert source.captions() == captions
    for i, (image, caption) in enumerate(source):
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
        np.testing.assert_array_equal(image, images[i])  # PNG is lossless, no resize at 32
        assert caption == captions[i]


def test_getitem_returns_a_copy(tmp_path):
    write_example_folder(tmp_path, random_images(1), ["a red circle"])
    source = ImageFolderSource(tmp_path)
    source[0][0][:] = 0
    assert source[0][0].any()


def test_resizes_to_image_size_and_converts_to_rgb(tmp_path):
    # A 48x48 grayscale image: left half black, right half white.
    gray = np.zeros((48, 48), dtype=np.uint8)
    gray[:, 24:] = 255
    (tmp_path / "img").mkdir()
    Image.fromarray(gray).save(tmp_path / "img" / "big.png")
    write_captions(tmp_path, [json.dumps({"image": "img/big.png", "caption": "half white"})])

    image, caption = ImageFolderSource(tmp_path, image_size=32)[0]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert caption == "half white"
    assert image[:, :8].max() < 20 and image[:, -8:].min() > 235  # content survived the resize


def test_split_is_deterministic_disjoint_and_complete(tmp_path):
    write_example_folder(tmp_path, random_images(20, size=8), [f"image {i}" for i in range(20)])
    source = ImageFolderSource(tmp_path, image_size=8)
    train, heldout = source.split(heldout_fraction=0.1, seed=0)
    assert len(heldout) == 2
    assert sorted(train + heldout) == list(range(20))
    assert source.split(heldout_fraction=0.1, seed=0) == (train, heldout)
    assert source.split(heldout_fraction=0.1, seed=1) != (train, heldout)


def test_split_keeps_one_heldout_image_for_tiny_folders(tmp_path):
    write_example_folder(tmp_path, random_images(3, size=8), ["a", "b", "c"])
    train, heldout = ImageFolderSource(tmp_path, image_size=8).split(heldout_fraction=0.1)
    assert len(train) == 2 and len(heldout) == 1


def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match="no_such_folder"):
        ImageFolderSource(tmp_path / "no_such_folder")


def test_missing_captions_file(tmp_path):
    with pytest.raises(InputError, match="captions.jsonl"):
        ImageFolderSource(tmp_path)


def test_bad_json_line_names_file_and_line(tmp_path):
    write_example_folder(tmp_path, random_images(2), ["a", "b"])
    lines = (tmp_path / "captions.jsonl").read_text().splitlines()
    write_captions(tmp_path, [lines[0], "", '{"image": "images/00001.png", "caption": "b"'])
    with pytest.raises(InputError, match=r"captions\.jsonl:3: invalid JSON"):
        ImageFolderSource(tmp_path)


@pytest.mark.parametrize("field", ["image", "caption"])
def test_missing_field_names_line_and_field(tmp_path, field):
    write_example_folder(tmp_path, random_images(2), ["a", "b"])
    record = {"image": "images/00001.png", "caption": "b"}
    del record[field]
    first = (tmp_path / "captions.jsonl").read_text().splitlines()[0]
    write_captions(tmp_path, [first, json.dumps(record)])
    with pytest.raises(InputError, match=rf'captions\.jsonl:2: missing or empty "{field}"'):
        ImageFolderSource(tmp_path)


def test_missing_image_file_is_named(tmp_path):
    write_captions(tmp_path, [json.dumps({"image": "gone.png", "caption": "a red circle"})])
    with pytest.raises(InputError, match="gone.png"):
        ImageFolderSource(tmp_path)


def test_unreadable_image_file_is_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    write_captions(tmp_path, [json.dumps({"image": "broken.png", "caption": "a red circle"})])
    with pytest.raises(InputError, match="broken.png"):
        ImageFolderSource(tmp_path)


def test_truncated_image_file_is_named(tmp_path):
    write_example_folder(tmp_path, random_images(1), ["a red circle"])
    png = tmp_path / "images" / "00000.png"
    png.write_bytes(png.read_bytes()[:200])  # header intact, pixel data cut off
    with pytest.raises(InputError, match="00000.png"):
        ImageFolderSource(tmp_path)


def test_empty_captions_file(tmp_path):
    write_captions(tmp_path, [""])
    with pytest.raises(InputError, match="no images"):
        ImageFolderSource(tmp_path)
