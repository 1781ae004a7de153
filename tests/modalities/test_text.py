import json
import os
import subprocess
import sys

import pytest

from nmm.errors import CheckpointError
from nmm.modalities.text import TextTokenizer, english_corpus

WORLD_SENTENCES = [
    "a small red circle at the top left and a large blue square at the center",
    "a green triangle at the bottom right",
    "a large red triangle next to a small blue circle",
    "two red circles and one yellow square",
]


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    # The world sentences are repeated so their words are frequent enough to earn merges.
    return TextTokenizer.train(english_corpus("train")[:200] + WORLD_SENTENCES * 20, vocab_size=1024)


def test_vocab_size_is_at_most_requested(tokenizer):
    assert 256 < tokenizer.vocab_size <= 1024


def test_round_trip_world_sentences(tokenizer):
    for sentence in WORLD_SENTENCES:
        assert tokenizer.decode(tokenizer.encode(sentence)) == sentence


def test_round_trip_heldout_english(tokenizer):
    heldout = english_corpus("heldout")
    assert heldout
    for paragraph in heldout[:100]:
        text = paragraph.lower()
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_keeps_unusual_spacing_and_unseen_characters(tokenizer):
    text = "  two  spaces,\ta tab\nand a newline: café ☺ "
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_lowercases(tokenizer):
    assert tokenizer.encode("A Red Circle") == tokenizer.encode("a red circle")


def test_frequent_world_words_are_single_tokens(tokenizer):
    for word in ["circle", "triangle", "red"]:
        # Mid-sentence words carry their leading space, as they do in real captions.
        assert len(tokenizer.encode(" " + word)) == 1, word


def test_encode_batch_matches_encode(tokenizer):
    assert tokenizer.encode_batch(WORLD_SENTENCES) == [tokenizer.encode(s) for s in WORLD_SENTENCES]


def test_decode_rejects_ids_outside_text_vocabulary(tokenizer):
    with pytest.raises(ValueError, match="outside the text vocabulary"):
        tokenizer.decode([1, tokenizer.vocab_size])
    with pytest.raises(ValueError):
        tokenizer.decode([-1])


def test_train_rejects_vocab_smaller_than_byte_alphabet():
    with pytest.raises(ValueError, match="256"):
        TextTokenizer.train(WORLD_SENTENCES, vocab_size=100)


def test_save_load_gives_identical_ids(tokenizer, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    tokenizer.save(path)
    loaded = TextTokenizer.load(path)
    assert loaded.vocab_size == tokenizer.vocab_size
    texts = WORLD_SENTENCES + english_corpus("heldout")[:20]
    assert loaded.encode_batch(texts) == tokenizer.encode_batch(texts)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left


def test_load_corrupt_file_raises_checkpoint_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        TextTokenizer.load(path)


def test_load_missing_file_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="missing.json"):
        TextTokenizer.load(tmp_path / "missing.json")


def test_english_corpus_splits_are_disjoint_and_deterministic():
    train, heldout = english_corpus("train"), english_corpus("heldout")
    assert len(train) > 1000
    assert 0.05 < len(heldout) / (len(train) + len(heldout)) < 0.15
    assert not set(train) & set(heldout)
    assert english_corpus("train") == train
    assert all(len(p) >= 40 and ">>>" not in p for p in train + heldout)


def test_english_corpus_rejects_unknown_split():
    with pytest.raises(ValueError):
        english_corpus("test")


def test_english_corpus_is_the_same_in_a_fresh_process():
    # A new interpreter with another hash seed catches any reliance on set or hash() ordering.
    code = "import json; from nmm.modalities.text import english_corpus; print(json.dumps(english_corpus('heldout')))"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == english_corpus("heldout")
