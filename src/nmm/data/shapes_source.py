"""`data.source=shapes`: the shapes world (nmm.data.shapes) and its judge (nmm.eval.judge) as a
data source of the core.

The core does not import this module: `nmm.data.sources.PLUGINS` names it, and the registry
imports it the first time the "shapes" source is asked for. It lives outside nmm.data.shapes
because the judge imports the world, and the source needs both.
"""

from __future__ import annotations

from nmm.config import DataConfig, RunConfig
from nmm.data.mixture import ImagePool, RoleSampler, build_shapes_pool, image_roles
from nmm.data.shapes import ShapesWorld
from nmm.data.sources import register_source, world_texts
from nmm.eval.judge import ShapesJudge
from nmm.modalities.codecs import Codecs

TOKENIZER_SCENES = 3000  # scenes whose captions, questions and edits train the text tokenizer


class ShapesSource:
    """Unlimited scenes with exact ground truth: the world renders, describes and edits them, the
    judge reads images back."""

    modalities = ("image",)

    def __init__(self, cfg: RunConfig):
        self.world = ShapesWorld(image_size=cfg.image.image_size, min_shapes=cfg.data.min_shapes,
                                 max_shapes=cfg.data.max_shapes)
        self.judge = ShapesJudge(self.world)
        self.seed, self.pool_size = cfg.data.seed, cfg.data.pool_size
        self.image_pool: ImagePool | None = None

    def texts(self) -> list[str]:
        return world_texts(self.world, TOKENIZER_SCENES, self.seed)

    def images(self) -> None:
        return None  # the image tokenizer renders its own training scenes from the world

    def roles(self, codecs: Codecs, cfg: DataConfig) -> dict[str, RoleSampler]:
        n = self.pool_size
        self.image_pool = build_shapes_pool(self.world, codecs, n, self.seed + 1, "train", n_edits=n // 4)
        return image_roles(self.image_pool, self.world, cfg.caption_dropout, cfg.qa_per_image, cfg.input_loss,
                           cfg.qa_caption_first)


register_source("shapes", ShapesSource)
