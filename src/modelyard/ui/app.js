// The modelyard dashboard: GPUs, models, live events, engine logs and a chat box.
// Plain DOM code on purpose (no build step, nothing fetched from the internet). Every
// string from the gateway is set with textContent, never parsed as HTML: model names,
// event reasons and engine log lines are not trusted markup.

import { ApiError, followStream, getJson, getKey, postJson, request, setKey, sseEvents } from "./api.js";

const REFRESH_MS = 3000;
const MAX_EVENTS = 300;
const MAX_LOG_LINES = 2000;

const $ = (id) => document.getElementById(id);

const view = {
  admin: true,
  status: null,
  rows: new Map(), // model name -> {row, cells}
  pending: new Set(), // "model:action" while an admin call runs
  selected: null,
  stopEvents: null,
  stopLog: null,
  refreshTimer: null,
  refreshSoon: null,
  chat: [],
  chatAbort: null,
};

// ----- small helpers -----

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

export function formatBytes(size) {
  if (size === null || size === undefined) return "–";
  let value = Number(size);
  for (const unit of ["B", "KiB", "MiB", "GiB"]) {
    if (Math.abs(value) < 1024) return unit === "B" ? `${value.toFixed(0)} B` : `${value.toFixed(1)} ${unit}`;
    value /= 1024;
  }
  return `${value.toFixed(1)} TiB`;
}

function formatAgo(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  if (seconds < 5) return "just now";
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 172800) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

function formatUptime(seconds) {
  const s = Math.floor(seconds);
  const days = Math.floor(s / 86400);
  const hours = Math.floor((s % 86400) / 3600);
  const minutes = Math.floor((s % 3600) / 60);
  if (days) return `${days}d ${hours}h`;
  if (hours) return `${hours}h ${minutes}m`;
  return `${minutes}m ${s % 60}s`;
}

function clock(unixSeconds) {
  return new Date(unixSeconds * 1000).toLocaleTimeString([], { hour12: false });
}

function toast(message, kind = "info") {
  const node = el("div", `toast ${kind}`, message);
  $("toasts").append(node);
  setTimeout(() => node.remove(), kind === "error" ? 9000 : 4000);
}

function notice(message) {
  const box = $("notice");
  box.textContent = message || "";
  box.hidden = !message;
}

function setAdmin(admin) {
  view.admin = admin;
  document.body.classList.toggle("no-admin", !admin);
}

// ----- status: models and GPUs -----

async function refresh() {
  try {
    if (view.admin) {
      const status = await getJson("/gateway/status");
      view.status = status;
      notice("");
      render(status);
    } else {
      await refreshPublic();
    }
  } catch (error) {
    handleAccessError(error);
  }
}

// A key that may use models but not administer them: show what /v1/models tells.
async function refreshPublic() {
  const listing = await getJson("/v1/models");
  const models = listing.data
    .filter((entry) => entry.id === entry.root)
    .map((entry) => ({ name: entry.id, state: entry.state, aliases: [], in_flight: null, queued: null }));
  render({ models, gpus: [] });
  fillChatModels(listing.data.map((entry) => entry.id));
}

function handleAccessError(error) {
  if (!(error instanceof ApiError)) {
    $("live-pill").dataset.live = "down";
    $("live-pill").textContent = "gateway unreachable";
    return;
  }
  if (error.status === 401) {
    notice("This gateway needs an API key. Enter one to see the models.");
    stopEventFeed();
    openKeyDialog();
  } else if (error.status === 403 && view.admin) {
    setAdmin(false);
    stopEventFeed();
    notice("This key is not an admin key: the event feed, logs and load/unload buttons are hidden.");
    refresh();
  } else {
    toast(error.message, "error");
  }
}

function render(status) {
  renderMeta(status);
  renderGpus(status.gpus || []);
  renderModels(status.models || []);
}

function renderMeta(status) {
  const parts = [];
  if (status.version) parts.push(`v${status.version}`);
  if (status.uptime_s !== undefined) parts.push(`up ${formatUptime(status.uptime_s)}`);
  if (status.queued) parts.push(`${status.queued} queued`);
  if (status.waiting_turn) parts.push(`${status.waiting_turn} waiting for a turn`);
  const nodes = status.nodes || [];
  if (nodes.length) {
    const lost = nodes.filter((node) => !node.alive).length;
    parts.push(`${nodes.length - lost} Ray nodes${lost ? ` (${lost} lost)` : ""}`);
  }
  $("gateway-meta").textContent = parts.join(" · ");
}

function renderGpus(gpus) {
  $("gpu-panel").hidden = gpus.length === 0;
  const box = $("gpus");
  box.replaceChildren();
  for (const gpu of gpus) {
    const total = Number(gpu.total_bytes) || 0;
    const used = Number(gpu.used_bytes) || 0;
    const planned = Number(gpu.planned_bytes) || 0;
    const free = gpu.free_bytes ?? Math.max(total - Math.max(used, planned), 0);
    const card = el("div", "gpu");
    card.dataset.gpu = gpu.index;
    const title = el("div", "gpu-title");
    // On a Ray cluster a GPU is the pair (node, GPU on that node).
    const label = gpu.node ? `${gpu.node} · GPU ${gpu.node_gpu}` : `GPU ${gpu.index}`;
    title.append(el("span", "", label), el("span", "muted", gpu.name || ""));
    const bar = el("div", "bar");
    bar.setAttribute("role", "img");
    bar.setAttribute("aria-label", `used ${formatBytes(used)}, planned ${formatBytes(planned)}, free ${formatBytes(free)} of ${formatBytes(total)}`);
    const usedPart = el("span", "used");
    usedPart.style.width = `${total ? (100 * used) / total : 0}%`;
    // Planned beyond what is already in use: memory promised to engines still loading.
    const plannedPart = el("span", "planned");
    plannedPart.style.width = `${total ? (100 * Math.max(planned - used, 0)) / total : 0}%`;
    bar.append(usedPart, plannedPart);
    const numbers = el("div", "gpu-numbers");
    numbers.append(
      el("span", "", `used ${formatBytes(used)}`),
      el("span", "", `planned ${formatBytes(planned)}`),
      el("span", "", `free ${formatBytes(free)} of ${formatBytes(total)}`),
    );
    card.append(title, bar, numbers);
    if (gpu.models && gpu.models.length) card.append(el("div", "gpu-models", gpu.models.join(", ")));
    box.append(card);
  }
}

function modelRow(name) {
  let entry = view.rows.get(name);
  if (entry) return entry;
  const row = el("tr");
  row.dataset.model = name;
  row.tabIndex = 0;
  const cells = {
    name: el("td"),
    state: el("td"),
    footprint: el("td", "num admin-only"),
    gpus: el("td", "admin-only"),
    inFlight: el("td", "num in-flight admin-only"),
    queued: el("td", "num queued admin-only"),
    lastUse: el("td", "last-use admin-only"),
    actions: el("td", "admin-only"),
  };
  const actions = el("div", "actions");
  const buttons = {};
  for (const action of ["load", "sleep", "unload"]) {
    const button = el("button", "small ghost", action[0].toUpperCase() + action.slice(1));
    button.type = "button";
    button.dataset.action = action;
    button.addEventListener("click", (event) => {
      event.stopPropagation();
      adminAction(name, action);
    });
    buttons[action] = button;
    actions.append(button);
  }
  cells.actions.append(actions);
  row.append(...Object.values(cells));
  row.addEventListener("click", () => openLog(name));
  row.addEventListener("keydown", (event) => {
    if (event.key === "Enter") openLog(name);
  });
  entry = { row, cells, buttons };
  view.rows.set(name, entry);
  return entry;
}

function renderModels(models) {
  const body = $("models");
  const seen = new Set();
  const counts = {};
  models.forEach((model, index) => {
    seen.add(model.name);
    counts[model.state] = (counts[model.state] || 0) + 1;
    const { row, cells, buttons } = modelRow(model.name);
    if (body.children[index] !== row) body.insertBefore(row, body.children[index] || null);
    row.classList.toggle("selected", view.selected === model.name);

    const subtitle = [...(model.aliases || [])];
    if (model.route) subtitle.push(model.route);
    // An engine that runs elsewhere: say where (it is connected to, never started here).
    if (model.engine === "remote" && model.url) subtitle.push(`remote ${model.url}`);
    cells.name.replaceChildren(el("span", "model-name", model.name));
    if (subtitle.length) cells.name.append(el("span", "model-sub", subtitle.join(" · ")));

    const badge = el("span", "state", model.state);
    badge.dataset.state = model.state;
    cells.state.replaceChildren(badge);
    const replicas = model.replicas;
    if (replicas && replicas.max > 1 && replicas.running > 1) {
      // Several engines of this model: how many, and each one's state and load on hover.
      const count = el("span", "replicas", `×${replicas.running}`);
      count.title = replicas.engines
        .map((engine) => `${engine.key}: ${engine.state}, ${engine.in_flight} in flight`)
        .join("\n");
      cells.state.append(count);
    }
    if (model.failure && model.failure.message) {
      cells.state.append(el("span", "failure", model.failure.message));
    }
    if (model.progress) {
      // A start in progress: its phase, and a bar where the engine says how far along it is.
      const progress = model.progress;
      const phase = el("span", "start-phase", progress.phase + (progress.detail ? ` · ${progress.detail}` : ""));
      cells.state.append(phase);
      if (progress.fraction !== null && progress.fraction !== undefined) {
        const bar = el("progress", "start-bar");
        bar.max = 1;
        bar.value = progress.fraction;
        bar.title = `${Math.round(progress.fraction * 100)} %`;
        cells.state.append(bar);
      }
    }
    const expected = model.prewarm;
    if (expected && expected.chance) {
      // Pre-warming on, the model stopped or asleep: how likely a request for it is soon, and
      // why (a pre-warm goes at 70 % or more, when it is worth its cost).
      const hint = el("span", "prewarm", `next: ${Math.round(expected.chance * 100)} % within ${Math.round(expected.within_s)} s`);
      hint.title = expected.reason;
      cells.state.append(hint);
    }
    row.dataset.state = model.state;

    const footprint = model.footprint_bytes;
    cells.footprint.textContent =
      footprint === null || footprint === undefined ? "–" : `${model.footprint_measured === false ? "~" : ""}${formatBytes(footprint)}`;
    cells.footprint.title = model.footprint_measured === false ? "estimated (not measured yet)" : "";
    // With replicas, the GPUs of all its engines.
    const replicaGpus = (replicas?.engines || []).flatMap((engine) => engine.gpus || []);
    const ownGpus = model.node ? model.node_gpus || [] : model.gpus || [];
    const gpuList = [...new Set(replicaGpus.length > 1 ? replicaGpus : ownGpus)].join(", ");
    cells.gpus.textContent = model.node ? `${model.node}${gpuList ? ` · GPU ${gpuList}` : ""}` : gpuList || "–";
    cells.inFlight.textContent = model.in_flight ?? "–";
    if (model.max_in_flight) cells.inFlight.textContent += ` / ${model.max_in_flight}`;
    // Waiting for a start, plus waiting for a turn at a busy engine (the fair queue).
    const waiting = model.queued === null || model.queued === undefined ? null : model.queued + (model.waiting_turn || 0);
    cells.queued.textContent = waiting ?? "–";
    cells.queued.title = "";
    const keys = Object.entries(model.keys || {}).filter(([, share]) => share.waiting || share.in_flight);
    if (keys.length) {
      // Each key's share of the engine now: in flight, waiting, its mean wait so far.
      const shares = keys.map(([key, share]) => `${key} ${share.in_flight}+${share.waiting} (waits ${share.mean_wait_s.toFixed(1)}s)`);
      cells.queued.title = shares.join("\n");
      cells.name.append(el("span", "model-sub", `keys: ${shares.join(" · ")}`));
    }
    cells.lastUse.textContent = model.in_flight ? "now" : formatAgo(model.last_used_ago_s);

    const state = model.state;
    const busy = (action) => view.pending.has(`${model.name}:${action}`);
    buttons.load.disabled = busy("load") || !["stopped", "failed", "sleeping"].includes(state);
    buttons.sleep.disabled = busy("sleep") || state !== "ready" || !model.can_sleep;
    buttons.sleep.title = model.can_sleep ? "" : "this model cannot sleep (set sleep: 1 or 2)";
    buttons.unload.disabled = busy("unload") || ["stopped", "stopping"].includes(state);
  });
  for (const [name, entry] of view.rows) {
    if (!seen.has(name)) {
      entry.row.remove();
      view.rows.delete(name);
    }
  }
  for (const child of [...body.children]) {
    if (!child.dataset.model) child.remove(); // the "no models" placeholder
  }
  if (!models.length) {
    const cell = el("td", "empty", "No models configured.");
    cell.colSpan = 8;
    const placeholder = el("tr");
    placeholder.append(cell);
    body.replaceChildren(placeholder);
  }
  const summary = Object.entries(counts).map(([state, count]) => `${count} ${state}`);
  $("models-summary").textContent = summary.join(" · ");
  if (view.admin) fillChatModels(null);
}

async function adminAction(model, action) {
  const key = `${model}:${action}`;
  view.pending.add(key);
  const entry = view.rows.get(model);
  if (entry) entry.buttons[action].disabled = true;
  scheduleRefresh();
  try {
    const result = await postJson(`/admin/models/${encodeURIComponent(model)}/${action}`);
    toast(`${model}: ${result.state}`);
  } catch (error) {
    toast(`${action} ${model}: ${error.message}`, "error");
  } finally {
    view.pending.delete(key);
    scheduleRefresh();
  }
}

function scheduleRefresh() {
  clearTimeout(view.refreshSoon);
  view.refreshSoon = setTimeout(refresh, 120);
}

// ----- live events -----

function startEventFeed() {
  stopEventFeed();
  const list = $("events");
  list.replaceChildren();
  view.stopEvents = followStream("/admin/events?recent=100", {
    onEvent: ({ data }) => {
      addEvent(JSON.parse(data));
      scheduleRefresh(); // a state changed: show it now, not at the next poll
    },
    onState: (state) => {
      const pill = $("live-pill");
      pill.dataset.live = state;
      pill.textContent = { live: "live", connecting: "connecting…", down: "reconnecting…", off: "no live feed" }[state];
    },
    onError: handleAccessError,
  });
}

function stopEventFeed() {
  if (view.stopEvents) view.stopEvents();
  view.stopEvents = null;
  const pill = $("live-pill");
  pill.dataset.live = "off";
  pill.textContent = "no live feed";
}

const pageOpened = Date.now() / 1000;

function addEvent(event) {
  const list = $("events");
  if (list.querySelector(`[data-id="${CSS.escape(String(event.id))}"]`)) return;
  // Only what happens while one watches flashes; the replayed history does not.
  const item = el("li", event.time > pageOpened ? "fresh" : "");
  item.dataset.id = event.id;
  item.dataset.kind = event.kind;
  if (event.model) item.dataset.model = event.model;
  const kind = el("span", "kind", event.kind.replaceAll("_", " "));
  kind.dataset.kind = event.kind;
  const reason = el("span", "reason", event.reason || "");
  if (event.duration_s !== null && event.duration_s !== undefined) {
    reason.append(el("span", "took", `${event.duration_s.toFixed(2)} s`));
  }
  item.title = new Date(event.time * 1000).toLocaleString();
  item.append(el("span", "when", clock(event.time)), kind, el("span", "model", event.model || "–"), reason);
  list.prepend(item);
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
  $("events-count").textContent = `last #${event.id}`;
}

// ----- engine log -----

function openLog(model) {
  if (!view.admin) return;
  if (view.stopLog) view.stopLog();
  view.selected = model;
  for (const [name, entry] of view.rows) entry.row.classList.toggle("selected", name === model);
  $("log-panel").hidden = false;
  $("log-model").textContent = model;
  const pre = $("log");
  pre.textContent = "";
  let lines = 0;
  let fresh = true;
  view.stopLog = followStream(`/admin/logs/${encodeURIComponent(model)}?follow=1&lines=300`, {
    onState: (state) => {
      // Each connection replays the tail: start from a clean page so lines do not repeat.
      if (state === "connecting") fresh = true;
    },
    onEvent: ({ data }) => {
      if (fresh) {
        pre.textContent = "";
        lines = 0;
        fresh = false;
      }
      pre.append(`${JSON.parse(data)}\n`);
      lines += 1;
      if (lines > MAX_LOG_LINES) {
        pre.textContent = pre.textContent.split("\n").slice(-MAX_LOG_LINES).join("\n");
        lines = MAX_LOG_LINES;
      }
      if ($("log-autoscroll").checked) pre.scrollTop = pre.scrollHeight;
    },
    onError: (error) => {
      pre.textContent = error.message;
    },
  });
}

function closeLog() {
  if (view.stopLog) view.stopLog();
  view.stopLog = null;
  view.selected = null;
  $("log-panel").hidden = true;
  for (const entry of view.rows.values()) entry.row.classList.remove("selected");
}

// ----- chat -----

let chatModelsLoaded = false;

async function fillChatModels(names) {
  const select = $("chat-model");
  if (names === null) {
    if (chatModelsLoaded) return;
    chatModelsLoaded = true;
    try {
      names = (await getJson("/v1/models")).data.map((entry) => entry.id);
    } catch {
      chatModelsLoaded = false;
      return;
    }
  }
  const current = select.value;
  const known = [...select.options].map((option) => option.value).join("\n");
  if (known === names.join("\n")) return;
  select.replaceChildren(...names.map((name) => el("option", "", name)));
  if (names.includes(current)) select.value = current;
}

function chatMessage(role, text) {
  const node = el("div", `msg ${role}`);
  if (role !== "error") node.append(el("span", "who", role === "user" ? "you" : $("chat-model").value));
  const body = el("span", "text", text);
  node.append(body);
  $("chat-log").append(node);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return { node, body };
}

async function sendChat(event) {
  event.preventDefault();
  if (view.chatAbort) {
    view.chatAbort.abort(); // the Send button is a Stop button while an answer streams
    return;
  }
  const input = $("chat-input");
  const text = input.value.trim();
  const model = $("chat-model").value;
  if (!text || !model) return;
  input.value = "";
  view.chat.push({ role: "user", content: text });
  chatMessage("user", text);
  const answer = chatMessage("assistant", "");
  answer.node.classList.add("pending");
  const controller = new AbortController();
  view.chatAbort = controller;
  $("chat-send").textContent = "Stop";
  let reply = "";
  try {
    const response = await request("/v1/chat/completions", {
      method: "POST",
      body: { model, messages: view.chat, stream: true },
      signal: controller.signal,
      accept: "text/event-stream",
    });
    for await (const { data } of sseEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(502, chunk.error.message, chunk.error.code);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        reply += delta.content;
        answer.body.textContent = reply;
        $("chat-log").scrollTop = $("chat-log").scrollHeight;
      }
    }
    view.chat.push({ role: "assistant", content: reply });
  } catch (error) {
    if (!controller.signal.aborted) {
      view.chat.pop(); // the question was not answered: let it be asked again
      chatMessage("error", error.message);
    }
    if (!reply) answer.node.remove();
  } finally {
    answer.node.classList.remove("pending");
    view.chatAbort = null;
    $("chat-send").textContent = "Send";
    scheduleRefresh(); // the model may have started for this answer
  }
}

// ----- API key -----

function openKeyDialog() {
  const dialog = $("key-dialog");
  $("key-input").value = getKey();
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

function useKey(key) {
  setKey(key);
  $("key-dialog").close();
  setAdmin(true);
  chatModelsLoaded = false;
  closeLog();
  start();
}

// ----- start -----

async function start() {
  clearInterval(view.refreshTimer);
  await refresh();
  if (view.admin && view.status) startEventFeed();
  view.refreshTimer = setInterval(() => {
    if (!document.hidden) refresh();
  }, REFRESH_MS);
}

function wire() {
  $("key-button").addEventListener("click", openKeyDialog);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    useKey($("key-input").value.trim());
  });
  $("key-forget").addEventListener("click", () => useKey(""));
  $("key-cancel").addEventListener("click", () => $("key-dialog").close());
  $("log-close").addEventListener("click", closeLog);
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("chat-clear").addEventListener("click", () => {
    view.chat = [];
    $("chat-log").replaceChildren();
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refresh();
  });
}

wire();
start();
