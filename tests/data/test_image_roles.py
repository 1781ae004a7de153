"""The image roles of the shapes world (`nmm.data.mixture.image_roles`): multi-turn QA documents and
the edit layout, whose prefix is the prompt `Pipeline.edit` builds (tests/test_api.py checks that one)."""

import numpy as np
import pytest

from nmm.data.mixture import ImagePool, build_shapes_pool, image_roles
from nmm.data.shapes import ShapesWorld
from nmm.modalities.codecs import Codecs
from nmm.modalities.document import ItemSegment, TextSegment

WORLD = ShapesWorld()


@pytest.fixture(scope="module")
def pool(tiny_run):
    codecs = Codecs.load(tiny_run)
    return codecs, build_shapes_pool(WORLD, codecs, 64, seed=3, n_edits=32)


def test_qa_documents_ask_several_distinct_questions_about_one_image(pool):
    _, p = pool
    qa = image_roles(p, WORLD, qa_per_image=4)["qa"]
    rng = np.random.default_rng(0)
    turns_seen = set()
    for _ in range(200):
        doc = qa(rng)
        image, *turns = doc.segments
        assert isinstance(image, ItemSegment) and not image.loss
        questions, answers = turns[0::2], turns[1::2]
        assert len(questions) == len(answers) and 1 <= len(questions) <= 4
        assert all(isinstance(t, TextSegment) for t in turns)
        assert not any(q.loss for q in questions) and all(a.loss for a in answers)
        assert len({q.text for q in questions}) == len(questions)  # a question is asked once
        turns_seen.add(len(questions))
    assert turns_seen >= {1, 2, 3}
    single = image_roles(p, WORLD)["qa"]
    assert all(len(single(rng).segments) == 3 for _ in range(50))  # the default: one question


def test_qa_answers_are_the_worlds_answers_for_that_scene(pool):
    _, p = pool
    # One distinct row of stand-in codes per scene, so a document's image names its scene.
    p = ImagePool(np.arange(len(p))[:, None].repeat(4, axis=1), p.captions, p.scenes)
    qa = image_roles(p, WORLD, qa_per_image=3)["qa"]
    rng = np.random.default_rng(1)
    by_codes = {tuple(c): s for c, s in zip(map(tuple, p.codes), p.scenes)}
    for _ in range(100):
        image, *turns = qa(rng).segments
        scene = by_codes[tuple(image.codes)]
        for q, a in zip(turns[0::2], turns[1::2]):
            if q.text == "how many shapes are there?":
                assert a.text == ("zero", "one", "two", "three")[len(scene.shapes)]
            elif q.text.startswith("what colour is the ") and " at the " not in q.text:
                kind = q.text.removeprefix("what colour is the ").rstrip("?")
                assert a.text == next(s.colour for s in scene.shapes if s.kind == kind)


def test_edit_documents_put_the_instruction_first_and_the_prompt_is_their_prefix(pool):
    codecs, p = pool
    edit = image_roles(p, WORLD)["edit"]
    doc = edit(np.random.default_rng(2))
    instruction, source, target = doc.segments
    assert isinstance(instruction, TextSegment) and not instruction.loss
    assert not source.loss and target.loss
    ids, is_target = codecs.encode_document(doc)
    v = codecs.vocab
    n = v.tokens_per_image
    first_boi = ids.index(v.boi)
    # Code j of the new image sits exactly n + 2 tokens after code j of the old one.
    assert ids[first_boi + 1 : first_boi + 1 + n] == list(source.codes)
    assert ids[first_boi + n + 3 : first_boi + 2 * n + 3] == list(target.codes)
    assert sum(is_target) == n + 3  # the new image's <boi>, codes and <eoi>, then <eos>
    prompt = codecs.prompt([instruction.text, ItemSegment("image", codes=source.codes)], open_item="image")
    assert ids[: len(prompt)] == prompt


def test_input_loss_makes_the_given_segments_targets(pool):
    _, p = pool
    rng = np.random.default_rng(4)
    plain = image_roles(p, WORLD, caption_dropout=0.0, qa_per_image=2)
    both = image_roles(p, WORLD, caption_dropout=0.0, qa_per_image=2, input_loss=("text", "image"))
    text_only = image_roles(p, WORLD, caption_dropout=0.0, qa_per_image=2, input_loss=("text",))
    for role in ("captioning", "generation", "qa", "edit"):
        assert all(s.loss for s in both[role](rng).segments)
        assert not all(s.loss for s in plain[role](rng).segments)  # without it, every role has given inputs
    gen = text_only["generation"](rng).segments
    assert gen[0].loss and isinstance(gen[0], TextSegment)
    cap = text_only["captioning"](rng).segments
    assert not cap[0].loss  # the image a caption reads stays given without "image"


def test_image_input_loss_needs_discrete_early_fusion():
    from nmm.config import ConfigError, load_config
    from nmm.train.trainer import check_roles

    cfg = load_config("shapes-tiny-continuous", ["data.input_loss=[text,image]"])
    with pytest.raises(ConfigError, match="data.input_loss.*discrete early fusion"):
        check_roles(cfg, model=None)
    with pytest.raises(ConfigError, match="data.input_loss.*'video' is not one of text, image"):
        load_config("shapes-tiny", ["data.input_loss=[video]"])


def test_qa_caption_first_captions_half_the_documents_before_asking(pool):
    _, p = pool
    qa = image_roles(p, WORLD, qa_per_image=2, qa_caption_first=True)["qa"]
    rng = np.random.default_rng(5)
    with_caption = 0
    for _ in range(400):
        image, *turns = qa(rng).segments
        if len(turns) % 2:  # a caption, then question/answer pairs
            caption = turns[0]
            assert caption.loss and caption.text in p.captions
            assert WORLD.parse_caption(caption.text) is not None
            with_caption += 1
    assert 150 < with_caption < 250
