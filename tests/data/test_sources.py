"""Data sources (nmm.data.sources): the registry behind `data.source`, and the two built-in sources."""

import subprocess
import sys

import numpy as np
import pytest

from nmm.config import load_config
from nmm.data import sources
from nmm.data.folder import write_example_folder
from nmm.data.shapes import ShapesWorld
from nmm.data.sources import data_source, register_source, world_texts
from nmm.errors import ConfigError


def test_shapes_is_found_by_module_name_on_first_use():
    """Core modules never import the shapes world; asking for the source does, without any extra import."""
    code = (
        "import sys\n"
        "import nmm.train.trainer, nmm.api\n"
        "from nmm.config import load_config\n"
        "from nmm.data.sources import data_source\n"
        "assert not any(m.startswith(('nmm.data.shapes', 'nmm.eval')) for m in sys.modules), sorted(sys.modules)\n"
        "source = data_source(load_config('shapes-tiny'))\n"
        "assert 'nmm.data.shapes_source' in sys.modules\n"
        "print(type(source.world).__name__, type(source.judge).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ShapesWorld", "ShapesJudge"]


def test_shapes_source_follows_the_config():
    cfg = load_config("shapes-tiny", ["data.max_shapes=2", "data.seed=3"])
    source = data_source(cfg)
    assert isinstance(source.world, ShapesWorld) and source.world.max_shapes == 2
    assert source.world.image_size == cfg.image.image_size
    assert source.judge.world is source.world
    assert source.images() is None  # the image tokenizer renders the world's scenes itself
    assert source.texts() == world_texts(source.world, 3000, 3)


def test_folder_source(tmp_path):
    world = ShapesWorld()
    scenes = world.scenes(10, 5, "train")
    images = [world.render(s) for s in scenes]
    folder = write_example_folder(tmp_path / "pics", images, [world.caption(s) for s in scenes])
    source = data_source(load_config("shapes-tiny", ["data.source=folder", f"data.folder={folder}"]))
    assert source.world is None and source.judge is None
    assert source.texts() == [world.caption(s) for s in scenes]
    np.testing.assert_array_equal(source.images(), np.stack(images))


def test_folder_source_needs_a_folder():
    with pytest.raises(ConfigError, match="data.folder=PATH"):
        data_source(load_config("shapes-tiny", ["data.source=folder"]))


def test_unknown_source_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown source 'nope' \(.*folder.*shapes"):
        data_source(load_config("shapes-tiny", ["data.source=nope"]))


def test_a_registered_source_is_built_from_the_run_config(monkeypatch):
    monkeypatch.setattr(sources, "SOURCES", dict(sources.SOURCES))  # leave the real registry alone

    class Captions:
        world = judge = None

        def __init__(self, cfg):
            self.seed = cfg.data.seed

        def texts(self):
            return [f"caption {self.seed}"]

    register_source("captions", Captions)
    register_source("captions", Captions)  # the same factory again: a no-op
    source = data_source(load_config("shapes-tiny", ["data.source=captions", "data.seed=7"]))
    assert source.texts() == ["caption 7"]
    with pytest.raises(ValueError, match="already registered"):
        register_source("captions", lambda cfg: None)
