// Pagoda's live engine page: the engine view (from /stats/stream) and the playground (/v1).
// Plain browser JavaScript, no dependencies: every call goes to the server that served the page,
// through relative URLs so that a --root-path prefix keeps working.
"use strict";

const KEY_STORAGE = "pagoda-api-key";
const HISTORY_POINTS = 120; // two minutes at one document a second
const CHART_HEIGHT = 160; // CSS pixels
const COLORS = {
  prompt: "#e08a1e", generation: "#2f6fdf", running: "#1f9d61", waiting: "#c2410c",
  free: "#e9ecf1", cached: "#9cc3f5", used: "#2f6fdf", shared: "#7c3aed", grid: "#e3e6eb",
  text: "#6b7280",
};
const BLOCK_COLORS = { ".": COLORS.free, c: COLORS.cached, u: COLORS.used, s: COLORS.shared };

const $ = (id) => document.getElementById(id);
const trend = { prompt: [], generation: [], running: [], waiting: [] };
let latest = null;
let modelName = null;
let keyPromise = null;

// --- the API key: asked for once, kept for this tab's session --------------------------------

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

function askForKey(refused) {
  if (keyPromise) return keyPromise;
  keyPromise = new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key-error").hidden = !refused;
    $("key-input").value = "";
    $("key-form").onsubmit = (event) => {
      event.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORAGE, key);
      dialog.close();
      keyPromise = null;
      resolve(key);
    };
    dialog.showModal();
  });
  return keyPromise;
}

// fetch() with the key; on a 401 ask for one (again) and retry.
async function api(path, options = {}) {
  for (;;) {
    const headers = new Headers(options.headers || {});
    const key = apiKey();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401) return response;
    await askForKey(Boolean(key));
  }
}

// Server-sent events of a fetch() response: calls onData with each `data:` payload.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) onData(line.slice(6));
      }
    }
  }
}

function setConnection(state, text) {
  const pill = $("connection");
  pill.dataset.state = state;
  pill.textContent = text;
}

// --- the engine view ----------------------------------------------------------------------

async function followStats() {
  for (;;) {
    try {
      const response = await api("stats/stream?interval=1");
      if (!response.ok) throw new Error(`stats: HTTP ${response.status}`);
      setConnection("live", "live");
      await readEvents(response, (data) => render(JSON.parse(data)));
      setConnection("connecting", "reconnecting");
    } catch (error) {
      setConnection("error", "disconnected");
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

function push(series, value) {
  series.push(value);
  if (series.length > HISTORY_POINTS) series.shift();
}

function formatRate(value) {
  return value >= 100 ? value.toFixed(0) : value.toFixed(1);
}

function formatBytes(bytes) {
  if (!bytes) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let unit = 0;
  while (bytes >= 1024 && unit < units.length - 1) { bytes /= 1024; unit += 1; }
  return `${bytes.toFixed(unit > 1 ? 1 : 0)} ${units[unit]}`;
}

function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  return seconds < 1 ? `${(seconds * 1000).toFixed(0)} ms` : `${seconds.toFixed(2)} s`;
}

function render(stats) {
  latest = stats;
  if (!modelName) $("model-name").textContent = stats.model;
  $("running-count").textContent = stats.running;
  $("waiting-count").textContent = stats.waiting;
  $("prompt-rate").textContent = formatRate(stats.throughput.prompt_tokens_per_s);
  $("generation-rate").textContent = formatRate(stats.throughput.generation_tokens_per_s);
  $("kv-usage").textContent = `${(stats.kv_cache.usage * 100).toFixed(1)}%`;
  $("hit-rate").textContent = stats.prefix_cache.queries
    ? `${(stats.prefix_cache.hit_rate * 100).toFixed(1)}%` : "–";
  $("preemptions").textContent = stats.totals.preemptions;
  $("memory").textContent =
    `${formatBytes(stats.memory.engine_rss_bytes)} / ${formatBytes(stats.memory.api_server_rss_bytes)}`;
  push(trend.prompt, stats.throughput.prompt_tokens_per_s);
  push(trend.generation, stats.throughput.generation_tokens_per_s);
  push(trend.running, stats.running);
  push(trend.waiting, stats.waiting);
  drawCharts();
  drawBlocks(stats.kv_cache);
  renderBatch(stats);
}

// Size a canvas's backing store to its CSS width and `height` CSS pixels at the screen's pixel
// ratio; drawing then uses CSS pixels.
function fitCanvas(canvas, height) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    canvas.style.height = `${height}px`;
  }
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  return { context, width, height };
}

function drawLines(canvas, series) {
  const { context, width, height } = fitCanvas(canvas, CHART_HEIGHT);
  context.clearRect(0, 0, width, height);
  const top = Math.max(1, ...series.flatMap((s) => s.values)) * 1.1;
  const left = 36, bottom = height - 16;
  context.strokeStyle = COLORS.grid;
  context.fillStyle = COLORS.text;
  context.font = "11px system-ui, sans-serif";
  context.lineWidth = 1;
  for (let i = 0; i <= 4; i += 1) {
    const y = bottom - (bottom - 6) * (i / 4);
    context.beginPath(); context.moveTo(left, y); context.lineTo(width, y); context.stroke();
    const label = top * (i / 4);
    context.fillText(label >= 10 ? label.toFixed(0) : label.toFixed(1), 2, y + 4);
  }
  const step = (width - left) / (HISTORY_POINTS - 1);
  for (const { values, color } of series) {
    context.strokeStyle = color;
    context.lineWidth = 2;
    context.beginPath();
    const offset = HISTORY_POINTS - values.length;
    values.forEach((value, index) => {
      const x = left + (offset + index) * step;
      const y = bottom - (bottom - 6) * (value / top);
      if (index === 0) context.moveTo(x, y); else context.lineTo(x, y);
    });
    context.stroke();
  }
}

function drawCharts() {
  drawLines($("throughput-chart"), [
    { values: trend.prompt, color: COLORS.prompt },
    { values: trend.generation, color: COLORS.generation },
  ]);
  drawLines($("requests-chart"), [
    { values: trend.running, color: COLORS.running },
    { values: trend.waiting, color: COLORS.waiting },
  ]);
}

function drawBlocks(kv) {
  const canvas = $("kv-grid");
  const cells = kv.maps.map((m) => m.block_map).join("");
  const count = Math.max(cells.length, 1);
  const width = canvas.clientWidth || 300;
  // The largest square cells (2 to 14 px) that fit every block within about 240 px of height.
  let size = Math.floor(Math.sqrt((width * 240) / count));
  size = Math.max(2, Math.min(14, size));
  const columns = Math.max(1, Math.floor(width / size));
  const rows = Math.ceil(count / columns);
  const { context } = fitCanvas(canvas, Math.max(size, rows * size));
  context.clearRect(0, 0, width, rows * size);
  const gap = size > 4 ? 1 : 0;
  for (let index = 0; index < cells.length; index += 1) {
    context.fillStyle = BLOCK_COLORS[cells[index]] || COLORS.free;
    const x = (index % columns) * size;
    const y = Math.floor(index / columns) * size;
    context.fillRect(x, y, size - gap, size - gap);
  }
  canvas.dataset.used = kv.used_blocks;
  canvas.dataset.free = kv.free_blocks;
  canvas.dataset.cached = kv.cached_free_blocks;
  const perCell = kv.maps.length ? kv.maps[0].blocks_per_cell : 1;
  $("kv-summary").textContent =
    `${kv.used_blocks} in use · ${kv.cached_free_blocks} cached · ${kv.free_blocks} free of ` +
    `${kv.num_blocks} blocks of ${kv.block_size} tokens` +
    (perCell > 1 ? ` (a cell is ${perCell} blocks)` : "");
}

function renderBatch(stats) {
  const { prefill_tokens: prefill, decode_tokens: decode } = stats.last_step;
  const total = prefill + decode;
  const bar = $("batch-bar");
  bar.querySelector(".prefill").style.width = total ? `${(100 * prefill) / total}%` : "0";
  bar.querySelector(".decode").style.width = total ? `${(100 * decode) / total}%` : "0";
  $("batch-summary").textContent =
    `last step: ${prefill} prompt + ${decode} generated tokens · ${stats.running} running`;
  const body = $("requests-table").querySelector("tbody");
  body.replaceChildren(...stats.requests.map((request) => {
    const row = document.createElement("tr");
    const share = request.prompt_tokens
      ? (100 * request.computed_prompt_tokens) / request.prompt_tokens : 100;
    const cells = [
      request.id, request.status, null, request.cached_tokens, request.output_tokens,
      request.blocks, formatSeconds(request.ttft_s), formatSeconds(request.elapsed_s),
    ];
    cells.forEach((value, index) => {
      const cell = document.createElement("td");
      if (index === 2) {
        const progress = document.createElement("span");
        progress.className = "progress";
        const fill = document.createElement("span");
        fill.style.width = `${share}%`;
        progress.append(fill);
        cell.append(progress, `${request.computed_prompt_tokens}/${request.prompt_tokens}`);
      } else {
        cell.textContent = String(value);
      }
      if (index === 0) cell.title = String(value);
      row.append(cell);
    });
    return row;
  }));
}

// --- the playground -------------------------------------------------------------------------

const conversation = [];

function timingText(timing, clientTtft) {
  if (!timing) return clientTtft === null ? "" : `TTFT ${formatSeconds(clientTtft)}`;
  const parts = [
    `TTFT ${formatSeconds(timing.time_to_first_token_seconds)}`,
    timing.decode_tokens_per_second
      ? `${timing.decode_tokens_per_second.toFixed(1)} tok/s` : null,
    `${timing.completion_tokens} tokens`,
    timing.cached_prompt_tokens ? `${timing.cached_prompt_tokens} prompt tokens cached` : null,
    `${formatSeconds(timing.inference_time_seconds)} total`,
  ];
  return parts.filter(Boolean).join(" · ");
}

async function streamCompletion(path, body, onText) {
  const started = performance.now();
  let firstText = null;
  let timing = null;
  const response = await api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      ...body, model: modelName || undefined, stream: true,
      stream_options: { include_usage: true }, include_timing: true,
    }),
  });
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error.message; } catch (error) { /* not JSON */ }
    throw new Error(message);
  }
  await readEvents(response, (data) => {
    if (data === "[DONE]") return;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(chunk.error.message);
    if (chunk.timing) timing = chunk.timing;
    for (const choice of chunk.choices || []) {
      const text = choice.delta ? choice.delta.content : choice.text;
      if (text) {
        if (firstText === null) firstText = (performance.now() - started) / 1000;
        onText(text);
      }
    }
  });
  return { timing, clientTtft: firstText };
}

function addMessage(role, text) {
  const message = document.createElement("div");
  message.className = `message ${role}`;
  const content = document.createElement("span");
  content.className = "content";
  content.textContent = text;
  message.append(content);
  $("chat-log").append(message);
  return message;
}

async function sendChat(event) {
  event.preventDefault();
  const input = $("chat-input");
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  const content = reply.querySelector(".content");
  $("chat-send").disabled = true;
  const system = $("system-prompt").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...conversation] : conversation;
  try {
    const result = await streamCompletion("v1/chat/completions", {
      messages,
      temperature: Number($("temperature").value),
      top_p: Number($("top-p").value),
      max_tokens: Number($("max-tokens").value) || 128,
    }, (piece) => { content.textContent += piece; });
    conversation.push({ role: "assistant", content: content.textContent });
    const timing = document.createElement("span");
    timing.className = "timing";
    timing.textContent = timingText(result.timing, result.clientTtft);
    reply.append(timing);
  } catch (error) {
    reply.classList.add("error");
    content.textContent = `Error: ${error.message}`;
    conversation.pop();
  } finally {
    $("chat-send").disabled = false;
  }
}

async function sendCompletion(event) {
  event.preventDefault();
  const output = $("complete-output");
  const prompt = $("complete-prompt").value;
  output.textContent = prompt;
  $("complete-stats").textContent = "";
  $("complete-send").disabled = true;
  try {
    const result = await streamCompletion("v1/completions", {
      prompt,
      max_tokens: Number($("complete-max-tokens").value) || 64,
      temperature: Number($("complete-temperature").value),
    }, (piece) => { output.textContent += piece; });
    $("complete-stats").textContent = timingText(result.timing, result.clientTtft);
  } catch (error) {
    $("complete-stats").textContent = `Error: ${error.message}`;
  } finally {
    $("complete-send").disabled = false;
  }
}

// --- wiring -------------------------------------------------------------------------------

function showTab(name) {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.classList.toggle("active", tab.dataset.tab === name);
  }
  for (const view of document.querySelectorAll(".view")) {
    view.classList.toggle("active", view.id === `view-${name}`);
  }
  if (name === "engine" && latest) render(latest);
}

async function loadModel() {
  try {
    const response = await api("v1/models");
    if (!response.ok) return;
    const models = await response.json();
    if (models.data && models.data.length) {
      modelName = models.data[0].id;
      $("model-name").textContent = modelName;
    }
  } catch (error) {
    // The stats stream reports the connection; the model name can wait for the next load.
  }
}

function start() {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => showTab(tab.dataset.tab));
  }
  for (const [input, output, digits] of [["temperature", "temperature-value", 2],
    ["top-p", "top-p-value", 2]]) {
    $(input).addEventListener("input", () => {
      $(output).textContent = Number($(input).value).toFixed(digits);
    });
  }
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("chat-clear").addEventListener("click", () => {
    conversation.length = 0;
    $("chat-log").replaceChildren();
  });
  $("complete-form").addEventListener("submit", sendCompletion);
  window.addEventListener("resize", () => { if (latest) render(latest); });
  loadModel().then(followStats);
}

start();
