"""Video in the server: `video_url` parts in chat (GIF, and MP4 / WebM where PyAV is installed), video
answers in chat (plain and streamed), OpenAI's videos API with the official `openai` client against a
live server, every video limit and bad input as a 4xx naming the problem, models without video, and the
playground in headless Chromium (attach a GIF, ask for a clip).

The model is video-tiny, trained here for a few steps (seconds), so captions are gibberish and clips
are noise: the tests check shapes, formats and plumbing, and that greedy answers are exactly what the
`Pipeline` gives for the same input.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import io
import shutil

import httpx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import nmm
from nmm.config import load_config
from nmm.modalities.video import write_gif
from nmm.serve import Limits, create_app
from nmm.train.trainer import train

HAVE_AV = importlib.util.find_spec("av") is not None  # PyAV reads MP4 / WebM; GIFs need only Pillow
CHAT = "/v1/chat/completions"
LIMITS = Limits(max_video_bytes=100_000, max_video_frames=40, max_video_pixels=40 * 32 * 32, max_video_seconds=10,
                max_stored_videos=3)
# The openai client marks its videos methods deprecated (the Sora API's shutdown date); they work all the same.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def served_video(tmp_path_factory):
    """(pipeline, model name) of video-tiny, trained for its few steps in a temporary folder."""
    run = tmp_path_factory.mktemp("video") / "video-tiny"
    train(load_config("video-tiny"), run, show_progress=False, log=lambda *a: None)
    return nmm.load(run, device="cpu"), "video-tiny"


@pytest.fixture(scope="module")
def video_server(served_video, live):
    with live(create_app(*served_video, limits=LIMITS)) as url:
        yield url


@pytest.fixture(scope="module")
def client(video_server):
    return openai.OpenAI(base_url=video_server + "/v1", api_key="unused", max_retries=0, timeout=60)


def codec_of(pipe):
    return pipe.codecs.modalities["video"]


def moving_clip(frames: int, size: int) -> np.ndarray:
    """A white square crossing a background that darkens: every frame differs (a GIF keeps them all)."""
    clip = np.zeros((frames, size, size, 3), np.uint8)
    side = max(2, size // 4)
    for i in range(frames):
        clip[i] = 220 - (i * 5) % 200
        x = i * (size - side) // max(frames - 1, 1)
        clip[i, size // 3 : size // 3 + side, x : x + side] = 255
    return clip


def video_part(data: bytes, mime: str = "image/gif") -> dict:
    return {"type": "video_url", "video_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def av_file(clip: np.ndarray, fmt: str = "mp4", codec: str = "mpeg4", fps: int = 8) -> bytes:
    """A clip as a video file written by PyAV (MPEG-4 part 2 in MP4, VP8 in WebM)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = clip.shape[2], clip.shape[1], "yuv420p"
        out.start_encoding()  # the header, even for a clip of no frames
        for frame in clip:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def gif_of_answer(message_content) -> bytes:
    """A chat video answer's content (a list with one video_url part) -> the GIF's bytes."""
    assert isinstance(message_content, list) and len(message_content) == 1
    part = message_content[0]
    assert part["type"] == "video_url"
    url = part["video_url"]["url"]
    assert url.startswith("data:image/gif;base64,")
    return base64.b64decode(url.split(",", 1)[1])


def check_gif(pipe, gif: bytes) -> np.ndarray:
    """A GIF the server wrote: the model's frame size, at most its frames (a GIF merges repeated frames),
    and the codec reads it back as a (frames, S, S, 3) clip."""
    codec = codec_of(pipe)
    with Image.open(io.BytesIO(gif)) as im:
        assert im.format == "GIF" and im.size == (codec.size, codec.size)
        assert 1 <= im.n_frames <= codec.config.frames
    clip = codec.from_bytes(gif)
    assert clip.shape == (codec.config.frames, codec.size, codec.size, 3) and clip.dtype == np.uint8
    return clip


def greedy_clip_gif(pipe, text: str) -> bytes:
    """What `Pipeline.generate_items` makes greedily for `text` (the server's defaults otherwise: CFG 2)."""
    return codec_of(pipe).to_bytes(pipe.generate_items("video", [text], temperature=0.0)[0])


def assert_error(r: httpx.Response, status: int, code: str, text: str, param: str | None = "?") -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and text in error["message"], error
    if param != "?":
        assert error["param"] == param, error


# ---- video in ------------------------------------------------------------------------------------
def test_model_card_says_what_a_clip_is(client, served_video):
    pipe, name = served_video
    card = client.models.retrieve(name).model_extra
    codec = codec_of(pipe)
    assert card["modalities"] == ["text", "video"]
    assert card["video"] == {"frames": codec.config.frames, "size": codec.size, "fps": codec.config.fps,
                             "seconds": codec.config.frames / codec.config.fps, "layout": codec.config.layout,
                             "max_tokens": codec.max_tokens, "can_generate": True}


def test_chat_about_a_gif(client, served_video):
    pipe, name = served_video
    codec = codec_of(pipe)
    gif = write_gif(moving_clip(12, 48))  # other frames and size than the model's: resampled
    clip = codec.from_bytes(gif)
    codes = pipe.codecs.encode_items("video", clip[None])[0]
    reply = client.chat.completions.create(model=name, max_tokens=10, messages=[
        {"role": "user", "content": [video_part(gif)]}])
    # (describe strips the text; a streamed answer keeps what follows its last word)
    assert reply.choices[0].message.content.strip() == pipe.describe("video", clip[None], max_new_tokens=10)[0]
    assert reply.usage.prompt_tokens == 1 + len(codes) + 2  # <bos> <bov> codes <eov>: a caption is asked for
    question = "what moves?"
    asked = client.chat.completions.create(model=name, max_tokens=4, messages=[
        {"role": "user", "content": [video_part(gif), {"type": "text", "text": question}]}])
    assert asked.usage.prompt_tokens == 1 + len(codes) + 2 + len(pipe.codecs.encode_text(question))
    assert isinstance(asked.choices[0].message.content, str)


def test_chat_about_an_mp4_or_webm(video_server, served_video):
    pipe, _ = served_video
    if not HAVE_AV:  # without PyAV only GIFs are read, and the answer says how to get the rest
        r = httpx.post(video_server + CHAT, timeout=60, json={"messages": [{"role": "user", "content": [
            video_part(b"\x00\x00\x00\x18ftypmp42" + bytes(64), "video/mp4")]}]})
        assert_error(r, 400, "invalid_video", "pip install av", "messages[0].content[0].video_url.url")
        return
    for data, mime in ((av_file(moving_clip(16, 32)), "video/mp4"),
                       (av_file(moving_clip(10, 40), "webm", "libvpx"), "video/webm")):
        r = httpx.post(video_server + CHAT, timeout=60, json={"max_tokens": 6, "messages": [
            {"role": "user", "content": [video_part(data, mime)]}]})
        assert r.status_code == 200, r.text
        clip = codec_of(pipe).from_bytes(data)
        assert r.json()["choices"][0]["message"]["content"].strip() == pipe.describe("video", clip[None], max_new_tokens=6)[0]


# ---- video out -----------------------------------------------------------------------------------
def test_chat_answers_with_a_video(client, served_video):
    pipe, name = served_video
    text = "a red circle moves right"
    reply = client.chat.completions.create(model=name, modalities=["text", "video"], temperature=0,
                                           messages=[{"role": "user", "content": text}])
    gif = gif_of_answer(reply.choices[0].message.content)  # the client passes the list of parts through
    check_gif(pipe, gif)
    assert gif == greedy_clip_gif(pipe, text)  # greedy: exactly what the Pipeline makes
    assert 1 <= reply.usage.completion_tokens <= codec_of(pipe).max_tokens + 1  # the codes and <eov>
    assert reply.choices[0].finish_reason in ("stop", "length")
    # n choices, sampled; sending an answer back makes it part of the next prompt
    two = client.chat.completions.create(model=name, modalities=["video"], n=2, seed=5,
                                         messages=[{"role": "user", "content": "a blue square"}])
    for choice in two.choices:
        check_gif(pipe, gif_of_answer(choice.message.content))
    follow = client.chat.completions.create(model=name, max_tokens=3, messages=[
        {"role": "user", "content": text}, {"role": "assistant", "content": reply.choices[0].message.content},
        {"role": "user", "content": "describe"}])
    assert follow.usage.prompt_tokens > 1 + 2  # the clip's codes are in it


def test_chat_streams_a_video(client, served_video):
    pipe, name = served_video
    text = "a green triangle"
    chunks = list(client.chat.completions.create(
        model=name, modalities=["text", "video"], temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": text}]))
    contents = [c.choices[0].delta.content for c in chunks if c.choices]
    assert contents[0] == ""  # the first delta: role and empty content, as for text
    clips = [c for c in contents if isinstance(c, list)]
    assert len(clips) == 1 and gif_of_answer(clips[0]) == greedy_clip_gif(pipe, text)
    assert chunks[-2].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens >= 1


# ---- OpenAI's videos API -------------------------------------------------------------------------
def test_videos_api_with_the_openai_client(client, served_video, video_server):
    pipe, name = served_video
    codec = codec_of(pipe)
    seconds, size = f"{codec.config.frames / codec.config.fps:g}", f"{codec.size}x{codec.size}"
    prompt = "a red circle moves right"
    video = client.videos.create(model=name, prompt=prompt, seconds=seconds, size=size,
                                 extra_body={"temperature": 0})  # nmm's sampling fields ride in the form
    assert video.object == "video" and video.id.startswith("video_") and video.status == "completed"
    assert video.progress == 100 and video.model == name and video.prompt == prompt and video.error is None
    assert (video.seconds, video.size) == (seconds, size) and video.completed_at >= video.created_at
    assert client.videos.retrieve(video.id).to_dict() == video.to_dict()

    gif = client.videos.download_content(video.id).content
    assert gif == greedy_clip_gif(pipe, prompt)
    check_gif(pipe, gif)
    S, F = codec.size, codec.config.frames
    thumbnail = Image.open(io.BytesIO(client.videos.download_content(video.id, variant="thumbnail").content))
    sheet = Image.open(io.BytesIO(client.videos.download_content(video.id, variant="spritesheet").content))
    assert thumbnail.format == sheet.format == "PNG" and thumbnail.size == (S, S) and sheet.size == (F * S, S)
    assert np.array_equal(np.asarray(thumbnail.convert("RGB")), np.asarray(sheet.convert("RGB"))[:, :S])

    # A JSON body works too, seconds and size may be left out, and the list shows the newest first.
    r = httpx.post(video_server + "/v1/videos", json={"prompt": "a blue square", "seed": 1}, timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "completed"
    listed = [v.id for v in client.videos.list()]
    assert listed[:2] == [r.json()["id"], video.id]
    assert client.videos.delete(video.id).deleted
    with pytest.raises(openai.NotFoundError, match="no video"):
        client.videos.retrieve(video.id)


def test_videos_are_kept_newest_first_and_bounded(served_video):
    c = TestClient(create_app(*served_video, limits=Limits(max_stored_videos=2)))
    ids = [c.post("/v1/videos", json={"prompt": f"clip {i}", "seed": i}).json()["id"] for i in range(3)]
    assert_error(c.get(f"/v1/videos/{ids[0]}"), 404, "video_not_found", "keeps the newest 2", "video_id")
    assert c.get(f"/v1/videos/{ids[2]}/content").headers["content-type"] == "image/gif"
    page = c.get("/v1/videos", params={"limit": 1}).json()
    assert [v["id"] for v in page["data"]] == [ids[2]] and page["has_more"] and page["last_id"] == ids[2]
    rest = c.get("/v1/videos", params={"limit": 1, "after": ids[2]}).json()
    assert [v["id"] for v in rest["data"]] == [ids[1]] and not rest["has_more"]
    assert [v["id"] for v in c.get("/v1/videos", params={"order": "asc"}).json()["data"]] == ids[1:]


# ---- limits and bad input ------------------------------------------------------------------------
def noise_gif(frames: int, size: int) -> bytes:
    rng = np.random.default_rng(0)
    return write_gif(rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8))


UNREADABLE = "not a readable video" if HAVE_AV else "reading MP4 / WebM needs PyAV"  # after Pillow could not
BAD_VIDEOS = [  # (file bytes, MIME type, error code, what the message says)
    (noise_gif(8, 128), "image/gif", "video_too_large", "larger than 100000 bytes"),
    (write_gif(moving_clip(41, 8)), "image/gif", "video_too_long", "more than 40 frames"),
    (write_gif(moving_clip(4, 128)), "image/gif", "video_too_large",
     "4 frames of 128x128, 65536 pixels in all, more than 40960"),
    (write_gif(moving_clip(3, 8), fps=0.2), "image/gif", "video_too_long", "15.00 s long; at most 10 s"),
    (write_gif(moving_clip(8, 32))[:30], "image/gif", "invalid_video", UNREADABLE),
    (b"certainly not a video" * 10, "video/mp4", "invalid_video", UNREADABLE),
    (b"", "video/mp4", "empty_video", "empty (0 bytes)"),
]
if HAVE_AV:  # files only PyAV reads: a container with a video stream and no frames, one with no video
    import soundfile as sf

    wav = io.BytesIO()
    sf.write(wav, np.zeros(1600), 16_000, format="WAV")
    BAD_VIDEOS += [(av_file(moving_clip(0, 32), "avi"), "video/x-msvideo", "empty_video", "has no frames"),
                   (wav.getvalue(), "video/mp4", "invalid_video", "has no video stream")]


@pytest.mark.parametrize("data, mime, code, text", BAD_VIDEOS)
def test_bad_video_inputs(video_server, data, mime, code, text):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, video_part(data, mime)]}]}
    r = httpx.post(video_server + CHAT, json=body, timeout=60)
    param = "messages[0].content[1].video_url.url"
    assert_error(r, 400, code, text, param)
    assert r.json()["error"]["message"].startswith(param)


def test_request_errors(video_server, served_video):
    def post(path, **kw):
        return httpx.post(video_server + path, timeout=60, **kw)

    def chat(content, **kw):
        return post(CHAT, json={"messages": [{"role": "user", "content": content}], **kw})

    gif = write_gif(moving_clip(8, 32))
    url_param = "messages[0].content[0].video_url.url"
    for url, text in (("https://example.com/a.mp4", "remote URLs are not fetched"),
                      ("data:text/plain;base64,aGVsbG8=", "of type video/* or image/gif"),
                      ("data:video/mp4;base64,@@@", "not valid base64")):
        assert_error(chat([{"type": "video_url", "video_url": {"url": url}}]), 400, "invalid_video_url", text, url_param)
    assert_error(chat([video_part(gif)] * 3), 400, "too_many_videos", "3 videos; at most 2", "messages")
    assert_error(chat([{"type": "video_url", "video_url": {}}]), 400, "invalid_value", "messages[0].content")
    assert_error(chat("a red circle", modalities=["video", "audio"]), 400, "invalid_value",
                 "a video and audio; an answer is one of them", "modalities")
    assert_error(chat([video_part(gif)], modalities=["video"]), 400, "invalid_value", "no text to make a video of",
                 "messages")
    assert_error(chat("the big red circle " * 60, modalities=["video"]), 400, "context_length_exceeded",
                 "with a video it exceeds the model's context", "messages")

    videos = "/v1/videos"
    assert_error(post(videos, data={"prompt": "a clip", "seconds": "4"}), 400, "invalid_value",
                 "seconds is '4'; this model makes clips of 2 s (8 frames at 4 fps)", "seconds")
    assert_error(post(videos, data={"prompt": "a clip", "size": "720x1280"}), 400, "invalid_value",
                 "size is '720x1280'; this model makes clips of 32x32", "size")
    assert_error(post(videos, data={"prompt": "a clip"}, files={"input_reference": ("a.png", b"png")}), 400,
                 "invalid_value", "input_reference is not supported", "input_reference")
    assert_error(post(videos, data={"seconds": "2"}), 400, "invalid_value", "prompt: Field required", "prompt")
    assert_error(post(videos, json={"prompt": " "}), 400, "invalid_value", "no text to make a video of", "prompt")
    assert_error(post(videos, json={"prompt": "a clip", "temperature": 9}), 400, "invalid_value", "temperature",
                 "temperature")
    assert_error(post(videos, json={"prompt": "a clip", "model": "sora-2"}), 404, "model_not_found",
                 "does not exist", "model")
    assert_error(post(videos, content=b"[1, 2]", headers={"content-type": "application/json"}), 400,
                 "invalid_json", "a JSON object or a multipart form")
    made = post(videos, json={"prompt": "a clip"}).json()["id"]
    assert_error(httpx.get(f"{video_server}{videos}/{made}/content", params={"variant": "mp4"}), 400,
                 "invalid_value", "use one of video, thumbnail, spritesheet", "variant")
    for method in ("GET", "DELETE"):
        assert_error(httpx.request(method, f"{video_server}{videos}/video_nope"), 404, "video_not_found",
                     "no video 'video_nope'", "video_id")
    assert_error(httpx.get(f"{video_server}{videos}/video_nope/content"), 404, "video_not_found", "no video")
    assert_error(httpx.get(f"{video_server}{videos}", params={"after": "video_nope"}), 404, "video_not_found",
                 "no video", "after")


def test_models_without_video(served, served_video):
    """A model with no video modality (shapes-tiny), and one whose video it only reads, say so."""
    gif = write_gif(moving_clip(8, 32))
    c = TestClient(create_app(*served))
    refusals = [
        c.post(CHAT, json={"messages": [{"role": "user", "content": [video_part(gif)]}]}),
        c.post(CHAT, json={"messages": [{"role": "user", "content": "a red circle"}], "modalities": ["text", "video"]}),
        c.post("/v1/videos", data={"prompt": "a red circle"}),
    ]
    for r in refusals:
        assert_error(r, 400, "video_not_supported", "this model has no video modality")
    assert "video" not in c.get("/v1/models").json()["data"][0]

    app = create_app(*served_video)
    app.state.server = dataclasses.replace(app.state.server, can_make_video=False)  # as a late-fusion model
    c = TestClient(app)
    for r in (c.post(CHAT, json={"messages": [{"role": "user", "content": "a red circle"}], "modalities": ["video"]}),
              c.post("/v1/videos", json={"prompt": "a red circle"})):
        assert_error(r, 400, "video_not_supported", "this model cannot generate video")
    assert c.post(CHAT, json={"max_tokens": 2, "messages": [
        {"role": "user", "content": [video_part(gif)]}]}).status_code == 200  # reading video still works


def test_fuzz_never_5xx(served_video):
    """Damaged GIFs and MP4s (bytes flipped, cut, headers claiming huge frames) and odd /v1/videos bodies:
    every answer is a 200 or a 4xx, never a 5xx."""
    c = TestClient(create_app(*served_video, limits=LIMITS), raise_server_exceptions=False)
    rng = np.random.default_rng(0)
    files = [(write_gif(moving_clip(8, 32)), "image/gif")]
    if HAVE_AV:
        files.append((av_file(moving_clip(8, 32)), "video/mp4"))
    statuses = []
    for i in range(40):
        data, mime = files[i % len(files)]
        data = bytearray(data)
        for at in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
            data[at] = int(rng.integers(0, 256))
        data = bytes(data[: int(rng.integers(len(data) // 2, len(data) + 1))] if i % 3 == 0 else data)
        r = c.post(CHAT, json={"max_tokens": 2, "messages": [{"role": "user", "content": [video_part(data, mime)]}]})
        statuses.append(r.status_code)
    bodies = [{"prompt": 3}, {"prompt": "x", "seconds": "nan"}, {"prompt": "x", "seconds": [2]}, {"prompt": None},
              {"prompt": "x", "size": 32}, {"prompt": "x", "input_reference": {"image_url": "https://a.b/c.png"}},
              {"prompt": "x" * 5000}, {"prompt": "x", "seed": -1}, {"prompt": "x", "top_k": 0}]
    statuses += [c.post("/v1/videos", json=body).status_code for body in bodies]
    statuses += [c.post("/v1/videos", data={"prompt": "x", "seconds": "2", "cfg_scale": "lots"}).status_code,
                 c.post("/v1/videos", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; "
                                                                       "boundary=x"}).status_code,
                 c.get("/v1/videos", params={"limit": 0}).status_code,
                 c.get("/v1/videos", params={"order": "sideways"}).status_code]
    assert all(s < 500 for s in statuses), statuses
    assert statuses[-len(bodies) - 4:] == [400] * (len(bodies) + 4)


# ---- the playground ------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver; .ci/run installs them)")
def test_playground_video_upload_and_answer(video_server, served_video, tmp_path):
    """Attach a GIF through the file input (it goes as a video_url part: its caption is the API's), then
    tick "Answer with a video": the answer is an <img> of a GIF that Chromium loads at the model's size."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The flags of test_playground_browser.py: no internet here, so Chromium's background services stay off.
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1100,800", f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(video_server + "/")
        wait.until(lambda d: "8-frame 32px clips" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "seed").send_keys("7")
        clip = tmp_path / "clip.gif"
        clip.write_bytes(write_gif(moving_clip(8, 32)))
        file_input = browser.find_element(By.ID, "file")
        browser.execute_script("arguments[0].hidden = false", file_input)  # WebDriver types only into shown inputs
        file_input.send_keys(str(clip))
        wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed())

        def answers():
            return browser.find_elements(By.CSS_SELECTOR, "#log .msg.assistant:not(.pending)")

        browser.find_element(By.ID, "prompt").send_keys(Keys.ENTER)
        wait.until(lambda d: len(answers()) == 1)
        api = httpx.post(video_server + CHAT, timeout=60, json={
            "messages": [{"role": "user", "content": [video_part(clip.read_bytes()), {"type": "text", "text": ""}]}],
            "temperature": 0.3, "top_p": 1, "max_tokens": 48, "cfg_scale": 2, "seed": 7}).json()
        expected = api["choices"][0]["message"]["content"] or "(empty answer)"
        assert answers()[0].find_element(By.TAG_NAME, "p").get_attribute("textContent") == expected

        browser.find_element(By.ID, "video_mode").click()
        browser.find_element(By.ID, "prompt").send_keys("a red circle moves right", Keys.ENTER)
        wait.until(lambda d: len(answers()) == 2)
        reply = answers()[1]
        assert "error" not in reply.get_attribute("class"), reply.text
        (img,) = reply.find_elements(By.TAG_NAME, "img")
        src = img.get_attribute("src")
        assert src.startswith("data:image/gif;base64,")
        check_gif(served_video[0], base64.b64decode(src.split(",", 1)[1]))
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 32
    finally:
        browser.quit()
