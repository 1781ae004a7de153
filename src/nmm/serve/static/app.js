// nmm playground: a chat over /v1/chat/completions with streaming, image upload and image answers.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], image: null };

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
    $("model").textContent = `${m.id} · ${m.image_size}px images · ${m.context_length}-token context`;
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
const scroll = () => ($("log").scrollTop = $("log").scrollHeight);

function clearAttachment() {
  state.image = null;
  $("preview").hidden = true;
  $("file").value = "";
}
$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  if (!file) return;
  const reader = new FileReader(); // the image travels as a data URL, as OpenAI's API expects
  reader.onload = () => {
    state.image = reader.result;
    $("preview").src = reader.result;
    $("preview").hidden = false;
  };
  reader.readAsDataURL(file);
});
$("preview").title = "click to remove";
$("preview").addEventListener("click", clearAttachment);
$("clear").addEventListener("click", () => {
  state.history = [];
  $("log").replaceChildren();
});

$("composer").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if ($("send").disabled || (!text && !state.image)) return;
  const user = bubble("user");
  let content = text;
  if (state.image) {
    addImage(user, state.image);
    content = [{ type: "image_url", image_url: { url: state.image } }, { type: "text", text }];
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
  return JSON.stringify(body);
}

// Streams one answer into a new bubble, rendering each text delta as the server decodes it; returns its
// content (text or image parts), or null on error.
async function send(messages) {
  const div = bubble("assistant pending");
  const textEl = addText(div, "");
  let text = "";
  const images = [];
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
        if (typeof delta.content === "string") {
          text += delta.content;
          textEl.textContent = text;
        } else if (Array.isArray(delta.content)) {
          for (const part of delta.content.filter((p) => p.type === "image_url")) {
            addImage(div, part.image_url.url);
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
  if (!text && !images.length) textEl.textContent = "(empty answer)";
  return images.length ? images : text;
}

loadModel();
