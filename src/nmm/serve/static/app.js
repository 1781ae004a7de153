// nmm playground: a chat over /v1/chat/completions with streaming, image, audio (or a recording) and video
// upload, and image, spoken or video answers. wav.js (loaded first) turns audio into input_audio parts.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { model: null, video: false, history: [], image: null, audio: null, clip: null, recorder: null };

for (const id of ["temperature", "top_p", "cfg_scale"]) {
  const show = () => ($(id + "-v").textContent = $(id).value);
  $(id).addEventListener("input", show);
  show();
}
$("api_key").value = localStorage.getItem("nmm_api_key") || "";
$("api_key").addEventListener("change", () => {
  localStorage.setItem("nmm_api_key", $("api_key").value);
  loadModel();
});

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error?.message || r.statusText);
    const m = body.data[0];
    state.model = m.id;
    const facts = [m.id];
    if (m.image_size) facts.push(`${m.image_size}px images`);
    if (m.audio) facts.push(`audio up to ${m.audio.max_seconds} s`);
    state.video = Boolean(m.video); // a GIF is then sent as a video; the video answer box is shown
    if (m.video) facts.push(`${m.video.frames}-frame ${m.video.size}px clips`);
    $("video-mode-label").hidden = !(m.video && m.video.can_generate);
    $("model").textContent = [...facts, `${m.context_length}-token context`].join(" · ");
    if (!m.image_size) $("prompt").placeholder = "type a sentence, or attach audio to transcribe";
  } catch (e) {
    $("model").textContent = "⚠ " + e.message;
  }
}

function bubble(role) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  $("log").appendChild(div);
  return div;
}
function addText(div, text) {
  const p = document.createElement("p");
  p.textContent = text;
  return div.appendChild(p);
}
function addImage(div, url) {
  const img = document.createElement("img");
  img.src = url;
  img.alt = "image";
  div.appendChild(img);
}
function addClip(div, url) { // a GIF plays in an <img>; an MP4 or WebM needs a <video>
  if (url.startsWith("data:image/")) return addImage(div, url);
  const video = document.createElement("video");
  Object.assign(video, { src: url, muted: true, autoplay: true, loop: true });
  div.appendChild(video);
}
function addAudio(div, url) {
  const audio = document.createElement("audio");
  audio.controls = true;
  audio.src = url;
  return div.appendChild(audio);
}
const scroll = () => ($("log").scrollTop = $("log").scrollHeight);

function clearPicture() { // the attached image or clip
  state.image = state.clip = null;
  $("preview").hidden = $("video-preview").hidden = true;
  $("video-preview").removeAttribute("src");
}
function clearAttachment() {
  clearPicture();
  $("file").value = "";
  clearAudio();
}
function clearAudio() {
  state.audio = null;
  $("audio-attachment").hidden = true;
  $("audio-preview").removeAttribute("src");
}
async function attachAudio(blob, name) {
  try {
    state.audio = await audioPart(blob, name);
    $("audio-preview").src = `data:audio/${state.audio.format};base64,${state.audio.data}`;
    $("audio-attachment").hidden = false;
  } catch (e) {
    const div = bubble("assistant error");
    addText(div, `cannot read that audio in this browser: ${e.message || e}`);
  }
}
$("audio-remove").addEventListener("click", clearAudio);
$("record").addEventListener("click", async () => {
  if (state.recorder) return state.recorder.stop(); // the second click ends the recording
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const recorder = new MediaRecorder(stream);
    const chunks = [];
    recorder.ondataavailable = (e) => chunks.push(e.data);
    recorder.onstop = () => {
      stream.getTracks().forEach((t) => t.stop());
      state.recorder = null;
      $("record").classList.remove("recording");
      attachAudio(new Blob(chunks, { type: recorder.mimeType }), "recording"); // webm/ogg -> WAV in wav.js
    };
    recorder.start();
    state.recorder = recorder;
    $("record").classList.add("recording");
  } catch (e) {
    addText(bubble("assistant error"), `cannot record: ${e.message || e}`);
  }
});
$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  if (!file) return;
  const video = file.type.startsWith("video/");
  if (!video && (file.type.startsWith("audio/") || /\.(wav|mp3|flac|ogg|webm|m4a)$/i.test(file.name))) {
    attachAudio(file, file.name);
    return;
  }
  // A video (or, for a model with video, a GIF) goes as a video_url part; GIFs and images preview in the <img>.
  const clip = video || (state.video && file.type === "image/gif");
  const reader = new FileReader(); // the file travels as a data URL, as OpenAI's API expects
  reader.onload = () => {
    clearPicture();
    state[clip ? "clip" : "image"] = reader.result;
    const shown = video ? $("video-preview") : $("preview");
    shown.src = reader.result;
    shown.hidden = false;
  };
  reader.readAsDataURL(file);
});
for (const id of ["preview", "video-preview"]) {
  $(id).title = "click to remove";
  $(id).addEventListener("click", clearAttachment);
}
$("clear").addEventListener("click", () => {
  state.history = [];
  $("log").replaceChildren();
});

$("composer").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if ($("send").disabled || (!text && !state.image && !state.audio && !state.clip)) return;
  const user = bubble("user");
  let content = text;
  if (state.image || state.audio || state.clip) { // parts: image, audio, video, then the text (the server's order)
    content = [];
    if (state.image) {
      addImage(user, state.image);
      content.push({ type: "image_url", image_url: { url: state.image } });
    }
    if (state.audio) {
      addAudio(user, $("audio-preview").src);
      content.push({ type: "input_audio", input_audio: state.audio });
    }
    if (state.clip) {
      addClip(user, state.clip);
      content.push({ type: "video_url", video_url: { url: state.clip } });
    }
    content.push({ type: "text", text });
  }
  if (text) addText(user, text);
  const message = { role: "user", content };
  $("prompt").value = "";
  clearAttachment();
  $("send").disabled = true;
  try {
    const reply = await send($("history").checked ? [...state.history, message] : [message]);
    if (reply !== null) state.history.push(message, { role: "assistant", content: reply });
  } finally {
    $("send").disabled = false;
    scroll();
  }
});

function requestBody(messages) {
  const num = (id) => Number($(id).value);
  const body = { model: state.model, messages, stream: true, temperature: num("temperature"),
                 top_p: num("top_p"), max_tokens: num("max_tokens"), cfg_scale: num("cfg_scale") };
  if ($("seed").value !== "") body.seed = num("seed");
  if ($("image_mode").checked) body.modalities = ["image"];
  if ($("video_mode").checked && !$("video-mode-label").hidden) body.modalities = ["text", "video"];
  if ($("speak").checked) {  // a spoken answer: OpenAI's audio output fields (the model has one voice)
    body.modalities = ["text", "audio"];
    body.audio = { voice: "default", format: "wav" };
  }
  return JSON.stringify(body);
}

// Streams one answer into a new bubble, rendering each text delta as the server decodes it; returns its
// content (text, or image or video parts; for speech, its transcript), or null on error.
async function send(messages) {
  const div = bubble("assistant pending");
  const textEl = addText(div, "");
  let text = "";
  const images = [];
  let spoken = null;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: requestBody(messages) });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error?.message || `HTTP ${r.status}`);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const events = buffer.split("\n\n");
      buffer = events.pop(); // an event may be cut across reads
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message); // a failure after the stream began
        const delta = chunk.choices[0]?.delta || {};
        if (delta.audio?.transcript !== undefined) textEl.textContent = text = delta.audio.transcript;
        if (delta.audio?.data !== undefined) {  // the whole WAV, once the model has ended its speech
          spoken = addAudio(div, "data:audio/wav;base64," + delta.audio.data);
          spoken.className = "answer";
        }
        if (typeof delta.content === "string") {
          text += delta.content;
          textEl.textContent = text;
        } else if (Array.isArray(delta.content)) {
          for (const part of delta.content.filter((p) => p.type === "image_url" || p.type === "video_url")) {
            addImage(div, (part.image_url || part.video_url).url); // a video answer is a GIF: it plays in <img>
            images.push(part);
          }
        }
        scroll();
      }
    }
  } catch (e) {
    div.classList.add("error");
    textEl.textContent = e.message;
    return null;
  } finally {
    div.classList.remove("pending");
  }
  if (!text && !images.length && !spoken) textEl.textContent = "(empty answer)";
  return images.length ? images : text;
}

loadModel();
