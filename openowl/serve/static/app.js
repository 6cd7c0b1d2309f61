// The openowl web demo: keeps the conversation (images as data: URIs), sends it to /v1/chat/completions with
// stream: true, and shows the answer as its chunks arrive. Model text is only ever set as textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], pending: [], controller: null };

function headers() {
  const key = $("api_key").value.trim();
  sessionStorage.setItem("openowl-api-key", key);
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
    state.model = body.data[0].id;
    $("model").textContent = `model: ${state.model}`;
  } catch (err) {
    $("model").textContent = `cannot list models: ${err.message}`;
  }
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attach(files, kind) {
  for (const file of files) {
    state.pending.push({ kind, url: await readAsDataURL(file) });
  }
  showAttachments();
}

function mediaElement(item) {
  const el = document.createElement(item.kind === "image" ? "img" : "video");
  el.src = item.url;
  if (item.kind === "video") el.muted = true;
  return el;
}

function showAttachments() {
  const box = $("attachments");
  box.replaceChildren(...state.pending.map(mediaElement));
}

function addMessage(role, text, media = []) {
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  el.append(...media.map(mediaElement), body);
  $("log").append(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function samplingFields() {
  const fields = {
    temperature: Number($("temperature").value || 0),
    top_p: Number($("top_p").value || 1),
    max_tokens: Number($("max_tokens").value || 128),
  };
  if ($("seed").value !== "") fields.seed = Number($("seed").value);
  return fields;
}

// Yields each `data:` payload of a server-sent-event stream.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length) yield data.join("\n");
    }
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text && !state.pending.length) return;
  if (!state.model) await loadModel();
  const media = state.pending;
  const content = media.map((m) => ({ type: `${m.kind}_url`, [`${m.kind}_url`]: { url: m.url } }));
  content.push({ type: "text", text });
  const message = { role: "user", content };
  addMessage("user", text, media);
  state.pending = [];
  showAttachments();
  $("prompt").value = "";
  $("images").value = "";
  $("video").value = "";

  const bubble = addMessage("assistant", "");
  const out = bubble.querySelector(".text");
  setBusy(true);
  state.controller = new AbortController();
  const request = { model: state.model, messages: [...state.history, message], stream: true, ...samplingFields() };
  let answer = "";
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: state.controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
    }
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        if (choice.delta.content) {
          answer += choice.delta.content;
          out.textContent = answer;
          bubble.scrollIntoView({ block: "end" });
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    state.history.push(message, { role: "assistant", content: answer });
  } catch (err) {
    if (err.name === "AbortError") {
      state.history.push(message, { role: "assistant", content: answer });
      finish = "stopped";
    } else {
      bubble.remove();
      $("log").lastElementChild.remove();  // the user's message did not enter the history
      state.pending = media;
      showAttachments();
      $("prompt").value = text;
      addMessage("error", err.message);
    }
  } finally {
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = finish ? `finish: ${finish}` : "";
    bubble.append(meta);
    bubble.dataset.done = "true";
    setBusy(false);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function clearHistory() {
  if (state.controller) state.controller.abort();
  state.history = [];
  state.pending = [];
  showAttachments();
  $("log").replaceChildren();
}

$("api_key").value = sessionStorage.getItem("openowl-api-key") || "";
$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("images").addEventListener("change", (e) => attach(e.target.files, "image"));
$("video").addEventListener("change", (e) => attach(e.target.files, "video"));
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", clearHistory);
$("api_key").addEventListener("change", loadModel);
loadModel();
