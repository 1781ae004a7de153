"""`data.source=shards`: batches streamed from WebDataset shards, split by rank and loader worker,
mixed by weight, and resumed at the exact sample (with and without background workers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import webdataset as wds

from nmm.config import load_config
from nmm.data.mixture import PackedBatches
from nmm.data.pack import pack
from nmm.data.shards import (
    Lane,
    SetReader,
    ShardSource,
    StreamingBatches,
    StreamPlan,
    read_shard,
)
from nmm.data.sources import data_source
from nmm.errors import ConfigError
from nmm.modalities.codecs import Codecs, untrained_codec
from nmm.modalities.text import TextTokenizer


def shard_config(shards: dict[str, float], *overrides: str):
    return load_config("shapes-tiny", ["data.source=shards", f"data.shards={json.dumps(shards)}",
                                       "train.batch_size=6", *overrides])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> str:
    """~230 shapes scenes in 12 shards of 20: the pattern."""
    return pack("shapes", tmp_path_factory.mktemp("shards") / "shapes", count=240, shard_size=20,
                show_progress=False)["pattern"]


@pytest.fixture(scope="module")
def few(tmp_path_factory) -> str:
    """~100 shapes scenes in 10 shards of 10: an epoch is over in a few batches."""
    return pack("shapes", tmp_path_factory.mktemp("shards") / "few", count=100, shard_size=10, seed=1,
                show_progress=False)["pattern"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the image codec's small convolutions run several times faster on a busy
    2-core machine (the results do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> str:
    """A text-only shard set: 4 shards of 30 lines "text line N"."""
    out = tmp_path_factory.mktemp("text-shards")
    with wds.ShardWriter(str(out / "text-%06d.tar"), maxcount=30, verbose=0) as writer:
        for i in range(120):
            writer.write({"__key__": f"{i:06d}", "txt": f"text line {i}"})
    return str(out / "text-{000000..000003}.tar")


@pytest.fixture(scope="module")
def codecs(shapes) -> Codecs:
    """A text tokenizer trained on the shards' captions and an image tokenizer at its initial weights:
    what is streamed does not depend on what the codecs learned."""
    cfg = shard_config({shapes: 1.0})
    torch.manual_seed(0)
    return Codecs(TextTokenizer.train(ShardSource(cfg).texts() + ["text line 0123456789"], vocab_size=300),
                  untrained_codec("image", cfg).eval())


def take(batches, start: int, stop: int) -> list:
    return [batches.batch(i) for i in range(start, stop)]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip((a.ids, a.targets, a.positions, a.doc_ids, a.generated),
                                                  (b.ids, b.targets, b.positions, b.doc_ids, b.generated)))


def test_the_source_gives_codec_training_data_from_the_head_of_the_shards(shapes):
    cfg = shard_config({shapes: 1.0}, "image.pool_size=50")
    source = data_source(cfg)
    assert isinstance(source, ShardSource) and source.modalities == ("image",)
    images = source.images()
    assert images.shape == (50, 32, 32, 3) and images.dtype == np.uint8 and images.max() > 0
    texts = source.texts()
    assert len(texts) > 200 and all(" at the " in t for t in texts)  # every shapes caption places its shapes
    with pytest.raises(ConfigError, match="data.shards"):
        data_source(load_config("shapes-tiny", ["data.source=shards"]))


def test_batches_are_packed_documents_of_the_shards_in_both_image_roles(shapes, codecs):
    cfg = shard_config({shapes: 1.0})
    source = ShardSource(cfg)
    captions = set(source.texts())
    batches = source.batches(codecs, cfg)
    assert batches.roles == ["captioning", "generation"]
    v, roles = codecs.vocab, set()
    for batch in take(batches, 0, 4):
        assert batch.ids.shape == (6, 160)
        for row in range(6):
            for d in range(int(batch.doc_ids[row].max()) + 1):
                ids = batch.ids[row][batch.doc_ids[row] == d].tolist()
                assert ids[0] == v.bos and ids[-1] == v.eos
                boi = ids.index(v.begin("image"))
                text = codecs.decode_text(ids)
                assert text in captions or text == ""  # a caption of the shards (or dropped, for CFG)
                roles.add("captioning" if boi == 1 and text else "generation")
                assert ids[boi + 1 + v.tokens_per_image] == v.end("image")
    assert roles == {"captioning", "generation"}
    assert batches.batch(3) is batches.batch(3)  # asked again (the trainer's FLOP count): the same batch
    with pytest.raises(ValueError, match="reads forwards"):
        batches.batch(1)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_mid_epoch(few, texts, codecs, workers):
    roles = "data.roles={captioning: 0.5, generation: 0.5, text: 1.0}"
    cfg = shard_config({few: 0.8, texts: 0.2}, f"data.num_workers={workers}", "data.prefetch=3", roles)
    source = ShardSource(cfg)
    whole = source.batches(codecs, cfg)
    expected = take(whole, 0, 26)  # past an epoch of each lane's share of the shards
    epochs = [s["sets"][0][0] for s in whole.state_dict()["lane_states"]]
    assert min(epochs) >= 1, epochs
    whole.close()

    first = source.batches(codecs, cfg)
    assert all(same(a, b) for a, b in zip(take(first, 0, 11), expected))
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert state["next_batch"] == 11 and all(s["sets"][0][2] > 0 for s in state["lane_states"])  # mid-shard
    first.close()
    resumed = source.batches(codecs, cfg)
    resumed.load_state_dict(state)
    assert all(same(a, b) for a, b in zip(take(resumed, 11, 26), expected[11:]))
    resumed.close()

    fresh = source.batches(codecs, cfg)  # skipping forward (a skipped data window) gives the same batches
    assert same(fresh.batch(16), expected[16])
    fresh.close()
    other = shard_config({few: 0.8, texts: 0.2}, f"data.num_workers={2 - workers}", roles)
    with pytest.raises(ConfigError, match="data.num_workers"):
        source.batches(codecs, other).load_state_dict(state)


def test_the_state_counts_only_batches_returned_not_those_prefetched(shapes, codecs):
    cfg = shard_config({shapes: 1.0}, "data.num_workers=2", "data.prefetch=4")
    batches = ShardSource(cfg).batches(codecs, cfg)
    batches.batch(0)
    state = batches.state_dict()
    # Lane 1 has prefetched batches by now; none returned yet, so its position is still the start. Lane
    # 0 has drawn the documents of batch 0 and those it holds back for the next batches; no more.
    lane = state["lane_states"][0]
    assert state["next_batch"] == 1 and state["lane_states"][1] is None
    in_batch = sum(int(batches.batch(0).doc_ids[r].max()) + 1 for r in range(6))
    assert lane["docs"] == in_batch + len(lane["pending"]) and lane["pending"]
    batches.close()


def test_ranks_and_workers_read_disjoint_shards_reshuffled_each_epoch(shapes, codecs):
    cfg = shard_config({shapes: 1.0}, "data.num_workers=2")
    source = ShardSource(cfg)
    n = len(source.sets[0].urls)
    for epoch in (0, 1):
        orders = [SetReader(source.sets[0], 0, p, 4, 0, None)._order(epoch) for p in range(4)]
        assert sorted(i for o in orders for i in o) == list(range(n))  # disjoint, and together every shard
    assert SetReader(source.sets[0], 0, 0, 4, 0, None)._order(0) != SetReader(source.sets[0], 0, 0, 4, 0, None)._order(1)

    # One stream alone hands out every sample once per epoch: none dropped, none twice.
    n_samples = sum(1 for url in source.sets[0].urls for _ in read_shard(url))
    reader = Lane(StreamPlan.build(source.sets, shard_config({shapes: 1.0}), 0, 1), codecs, 0).readers[0]
    assert len({reader.next().key for _ in range(n_samples)}) == n_samples
    assert reader.next() is not None and reader.position()[0] == 1  # then the next epoch

    read: dict[tuple[int, int], set[str]] = {}
    for rank in (0, 1):
        plan = StreamPlan.build(source.sets, cfg, rank, world_size=2)
        for lane in (0, 1):
            reader = Lane(plan, codecs, lane).readers[0]
            read[rank, lane] = {reader.next().key for _ in range(40)}
    keys = list(read.values())
    assert all(len(k) == 40 for k in keys)
    assert all(not (a & b) for i, a in enumerate(keys) for b in keys[i + 1:])

    with pytest.raises(ConfigError, match=r"12 shards cannot be split among 4 ranks x 4 loader workers = 16"):
        StreamPlan.build(source.sets, shard_config({shapes: 1.0}, "data.num_workers=4"), 0, world_size=4)


def test_shard_sets_are_mixed_by_their_weights(shapes, texts, codecs):
    cfg = shard_config({shapes: 0.75, texts: 0.25}, "data.roles={captioning: 1, generation: 1, text: 1}")
    batches = ShardSource(cfg).batches(codecs, cfg)
    image = total = 0
    v = codecs.vocab
    for batch in take(batches, 0, 40):
        for row in range(6):
            for d in range(int(batch.doc_ids[row].max()) + 1):
                ids = batch.ids[row][batch.doc_ids[row] == d]
                total += 1
                image += bool((ids == v.begin("image")).any())
    # Text documents are short and share rows, so the rows hold more documents than images.
    assert total > 300 and abs(image / total - 0.75) < 0.06, (image, total)


def test_packed_batches_keep_no_state(codecs):
    from nmm.data.mixture import DocumentMixture, text_role

    mixture = DocumentMixture(load_config("shapes-tiny").data, codecs, text_role(["some text here"]))
    batches = PackedBatches(mixture, 2, 32, 0)
    assert batches.state_dict() == {}
    batches.load_state_dict({})
    assert same(batches.batch(3), PackedBatches(mixture, 2, 32, 0).batch(3))  # a pure function of the index
    with pytest.raises(ValueError, match="no loader state"):
        batches.load_state_dict({"next_batch": 3})


def test_train_on_shards_streams_and_resumes_exactly(shapes, tmp_path, monkeypatch):
    """`nmm train` with data.source=shards reads StreamingBatches (2 loader workers), in order; a run
    killed after its step-2 checkpoint resumes on batch 2, and every batch it trained on is the
    stream's own (the same batches an uninterrupted run reads)."""
    from nmm.train.trainer import train

    seen: list[tuple[int, torch.Tensor]] = []
    read = StreamingBatches.batch

    class Killed(Exception):
        pass

    def recording(self, index):
        if index == 2 and not resuming:
            raise Killed  # the process dies here: after the step-2 checkpoint, before step 3's data
        batch = read(self, index)
        seen.append((index, batch.ids.clone()))
        return batch

    cfg = load_config("shapes-tiny", ["data.source=shards", f"data.shards={json.dumps({shapes: 1.0})}",
                                      "data.num_workers=2", "train.max_steps=4", "train.ckpt_every=2",
                                      "train.threads=1", "image.steps=5"])
    quiet = {"show_progress": False, "log": lambda *a, **k: None}
    monkeypatch.setattr(StreamingBatches, "batch", recording)
    resuming = False
    with pytest.raises(Killed):
        train(cfg, tmp_path / "run", **quiet)
    assert sorted({i for i, _ in seen}) == [0, 1]
    resuming = True
    assert train(cfg, tmp_path / "run", resume=True, **quiet)["steps"] == 4
    assert sorted({i for i, _ in seen}) == [0, 1, 2, 3] and seen[3][0] == 2  # resumed at batch 2

    reference = ShardSource(cfg).batches(Codecs.load(tmp_path / "run"), cfg)  # the run's codecs, rank 0 of 1
    expected = take(reference, 0, 4)
    reference.close()
    assert all(torch.equal(ids, expected[i].ids) for i, ids in seen)


def test_audio_and_video_shards_train_their_codecs_and_stream_in_their_roles(shapes, tmp_path):
    from nmm.data.audio_folder import write_example_audio_folder
    from nmm.data.video_folder import write_example_video_folder

    t = np.arange(8000) / 16000
    waves = [0.3 * np.sin(2 * np.pi * f * t) for f in (220, 330, 440, 550)]
    speech = pack(write_example_audio_folder(tmp_path / "speech", waves, ["one two", "three four", "five six", "seven"]),
                  tmp_path / "a", shard_size=2, show_progress=False)["pattern"]
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8) for _ in range(4)]
    videos = pack(write_example_video_folder(tmp_path / "videos", clips, ["a clip", "two clips", "third clip", "fourth"]),
                  tmp_path / "v", shard_size=2, show_progress=False)["pattern"]
    roles = "data.roles={captioning: 1, generation: 1, transcription: 1, synthesis: 1, video_captioning: 1, text_to_clip: 1}"
    cfg = shard_config({shapes: 0.4, speech: 0.3, videos: 0.3}, roles, "audio.pool_size=3", "audio.eval_items=1")
    source = ShardSource(cfg)
    assert source.modalities == ("image", "audio", "video")
    assert [len(w) for w in source.waves()] == [8000] * 3 and len(source.heldout_waves()) == 1  # the 4th clip
    assert source.part("video").clips_frames(3).shape == (3, 8, 32, 32, 3)  # video.frames frames of 32 px
    assert source.part("video").images().shape[1:] == (32, 32, 3)

    codecs = Codecs(TextTokenizer.train(source.texts(), vocab_size=300),
                    *(untrained_codec(m, cfg).eval() for m in source.modalities))
    batches = source.batches(codecs, cfg)
    assert batches.roles == ["captioning", "generation", "transcription", "synthesis", "video_captioning",
                             "text_to_clip"]
    assert np.allclose(batches.weights, [0.2, 0.2, 0.15, 0.15, 0.15, 0.15])  # set weight x role share
    expected = take(batches, 0, 8)
    for m in ("image", "audio", "video"):
        assert sum(int((b.ids == codecs.vocab.begin(m)).sum()) for b in expected) > 0, m
    resumed = source.batches(codecs, cfg)
    resumed.load_state_dict(json.loads(json.dumps(batches.state_dict())))
    assert all(same(a, b) for a, b in zip(take(resumed, 8, 12), take(batches, 8, 12)))


def test_the_loader_benchmark_runs_and_reports_every_variant():
    from nmm.bench.loader import format_table, run_loader

    result = run_loader(samples=80, shard_size=20, batches=2, workers=(0, 2), batch_size=4, seq_len=160, threads=1,
                        log=lambda *a: None)
    assert list(result["variants"]) == ["streaming, 0 workers", "streaming, 2 workers", "PackedBatches, in memory"]
    assert all(r["samples_per_s"] > 0 and r["batch_shape"] == [4, 160] for r in result["variants"].values())
    assert "samples/s" in format_table(result) and json.loads(json.dumps(result)) == result
