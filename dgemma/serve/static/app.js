// The dgemma playground: sends OpenAI-style requests with `draft_events` and draws each denoising step.
// Owns: the page's forms, reading the server-sent events, the live canvas view and the statistics line.
// Talks only to this server's /v1 routes; no libraries, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let modelName = null;
let controller = null;
let previous = null; // the last drawn draft, to mark what changed

$("api-key").value = localStorage.getItem("dgemma-api-key") || "";
$("api-key").addEventListener("change", () => localStorage.setItem("dgemma-api-key", $("api-key").value));

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("api-key").value) h["Authorization"] = "Bearer " + $("api-key").value;
  return h;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadModel() {
  const r = await fetch("/v1/models", { headers: headers() });
  const body = await r.json();
  if (!r.ok) { setStatus(body.error ? body.error.message : "cannot list models", true); return; }
  const card = body.data[0];
  modelName = card.id;
  $("model-name").textContent = `${card.id} · canvas ${card.canvas_length} · ${card.defaults.max_denoising_steps} steps`;
}

// The request fields shared by every mode: diffusion settings and the seed.
function common() {
  const body = { model: modelName, stream: true, draft_events: true };
  const num = (id) => ($(id).value === "" ? null : Number($(id).value));
  if (num("steps") !== null) body.max_denoising_steps = num("steps");
  if (num("entropy-bound") !== null) body.entropy_bound = num("entropy-bound");
  if (num("seed") !== null) body.seed = num("seed");
  return body;
}

// A printable form of one token: control characters as their Unicode pictures, space as an open box.
function visible(text) {
  if (text === "") return "·";
  return Array.from(text).map((ch) => {
    const code = ch.codePointAt(0);
    if (ch === " ") return "␣";
    if (ch === "\n") return "↵";
    if (code < 32) return String.fromCodePoint(0x2400 + code);
    return ch;
  }).join("");
}

function drawCanvas(tokens, accepted, done, pinned) {
  const box = $("canvas");
  box.replaceChildren();
  tokens.forEach((tok, i) => {
    const cell = document.createElement("span");
    cell.className = "cell";
    if (pinned && pinned[i]) cell.classList.add("pinned");
    else if (accepted[i]) cell.classList.add("accepted");
    else if (previous && previous[i] !== tok) cell.classList.add("changed");
    if (done) cell.classList.add("done");
    cell.textContent = visible(tok);
    box.appendChild(cell);
  });
  previous = tokens;
  box.dataset.steps = String(Number(box.dataset.steps) + 1);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// POST `body` to `path` and hand each server-sent event to `on(event, data)` until [DONE].
async function stream(path, body, on) {
  controller = new AbortController();
  const r = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body),
                                signal: controller.signal });
  if (!r.ok) {
    const err = await r.json().catch(() => ({}));
    throw new Error(err.error ? err.error.message : `HTTP ${r.status}`);
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = null;
      const data = [];
      for (const line of frame.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
      const text = data.join("\n");
      if (text === "[DONE]") return;
      const parsed = JSON.parse(text);
      if (parsed.error) throw new Error(parsed.error.message);
      await on(event, parsed);
    }
  }
}

function startRun() {
  previous = null;
  $("canvas").dataset.steps = "0";
  $("canvas").replaceChildren();
  $("stats").textContent = "";
  $("generate").disabled = $("regenerate").disabled = $("fill-holes").disabled = true;
  $("stop").disabled = false;
  setStatus("running");
  return performance.now();
}

function endRun(error) {
  $("generate").disabled = $("regenerate").disabled = $("fill-holes").disabled = false;
  $("stop").disabled = true;
  controller = null;
  if (error && error.name === "AbortError") setStatus("stopped");
  else if (error) setStatus("error: " + error.message, true);
  else setStatus("done");
}

function showStats(started, tokens, steps, stepCount) {
  const seconds = (performance.now() - started) / 1000;
  $("stats").textContent = `${tokens} tokens in ${seconds.toFixed(2)} s · ${(tokens / seconds).toFixed(1)} tokens/s · ` +
    `steps per canvas [${steps.join(", ")}] · ${stepCount} steps drawn`;
}

// Draws a draft frame (after the optional per-step delay) and counts it.
async function onDraft(data, state) {
  const row = data.choices[0];
  $("step-label").textContent = `#${data.canvas} · step ${data.step}`;
  drawCanvas(row.tokens, row.accepted, row.done, data.pinned);
  state.drawn += 1;
  const delay = Number($("delay").value);
  if (delay > 0) await sleep(delay);
}

async function generate() {
  const chat = $("chat").checked;
  const body = common();
  body.max_tokens = Number($("max-tokens").value);
  body.stream_options = { include_usage: true };
  if (chat) {
    body.messages = [{ role: "user", content: $("prompt").value }];
    body.thinking = $("thinking").checked;
  } else {
    body.prompt = $("prompt").value;
  }
  $("output").textContent = "";
  $("reasoning").textContent = "";
  $("reasoning").hidden = true;
  const started = startRun();
  const state = { drawn: 0, tokens: 0, steps: [] };
  try {
    await stream(chat ? "/v1/chat/completions" : "/v1/completions", body, async (event, data) => {
      if (event === "draft") return onDraft(data, state);
      if (event === "canvas") {
        state.steps.push(data.steps[0]);
        state.tokens += data.tokens[0];
        showStats(started, state.tokens, state.steps, state.drawn);
        return;
      }
      if (data.usage) state.tokens = data.usage.completion_tokens;
      const choice = data.choices[0];
      if (!choice) return;
      $("output").textContent += chat ? (choice.delta.content || "") : choice.text;
      if (chat && choice.delta.reasoning_content) {
        $("reasoning").hidden = false;
        $("reasoning").textContent += choice.delta.reasoning_content;
      }
    });
    showStats(started, state.tokens, state.steps, state.drawn);
    endRun(null);
  } catch (error) {
    endRun(error);
  }
}

// Infill or edit: `path` is /v1/infill or /v1/edit; the final frame holds the whole text.
async function fill(path, body) {
  Object.assign(body, common());
  $("edit-result").textContent = "";
  const started = startRun();
  const state = { drawn: 0 };
  try {
    await stream(path, body, async (event, data) => {
      if (event === "draft") return onDraft(data, state);
      $("edit-result").textContent = data.text;
      $("edit-text").value = data.text;
      showStats(started, data.usage.completion_tokens, data.dgemma.steps_per_canvas[0], state.drawn);
    });
    endRun(null);
  } catch (error) {
    endRun(error);
  }
}

function regenerate() {
  const area = $("edit-text");
  const text = area.value;
  const start = Array.from(text.slice(0, area.selectionStart)).length; // UTF-16 -> code points
  const end = Array.from(text.slice(0, area.selectionEnd)).length;
  if (start === end) { setStatus("select the span to regenerate first", true); return; }
  const body = { text, selection: { start, end } };
  if ($("instruction").value) body.instruction = $("instruction").value;
  if ($("fill-length").value) body.fill_length = Number($("fill-length").value);
  return fill("/v1/edit", body);
}

function fillHoles() {
  const body = { text: $("edit-text").value };
  if ($("fill-length").value) body.fill_length = Number($("fill-length").value);
  return fill("/v1/infill", body);
}

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    for (const other of document.querySelectorAll(".tab")) other.classList.toggle("active", other === tab);
    $("mode-generate").hidden = tab.dataset.mode !== "generate";
    $("mode-edit").hidden = tab.dataset.mode !== "edit";
  });
}
$("generate").addEventListener("click", generate);
$("regenerate").addEventListener("click", regenerate);
$("fill-holes").addEventListener("click", fillHoles);
$("stop").addEventListener("click", () => controller && controller.abort());
loadModel().catch((error) => setStatus("error: " + error.message, true));
