// Talking to the gateway: the API key, JSON calls, and Server-Sent-Events over fetch.
// EventSource cannot send an Authorization header, so streams are read with fetch and a
// ReadableStream instead; the key never appears in a URL (and so never in a log).

const KEY_STORAGE = "modelyard.apiKey";

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function getKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

function headers(extra = {}) {
  const result = { ...extra };
  const key = getKey();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message, code);
}

export async function request(path, { method = "GET", body, signal, accept } = {}) {
  const init = { method, signal, headers: headers(accept ? { Accept: accept } : {}) };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function getJson(path, options) {
  return (await request(path, options)).json();
}

export async function postJson(path, body, options = {}) {
  return (await request(path, { ...options, method: "POST", body })).json();
}

// Yields {id, data} for each event of an SSE response body; comment lines are skipped.
export async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let id = null;
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
          else if (line.startsWith("id:")) id = line.slice(3).trim();
        }
        if (data.length) yield { id, data: data.join("\n") };
      }
    }
  } finally {
    reader.releaseLock();
  }
}

// Keeps an SSE stream open: reconnects with a growing pause and resumes after the last id.
// onState gets "connecting", "live" or "down"; onError gets an ApiError that will not
// heal by retrying (401/403/404), and then the stream stops.
export function followStream(path, { onEvent, onState = () => {}, onError = () => {} }) {
  const controller = new AbortController();
  let lastId = null;
  let pause = 500;
  (async () => {
    while (!controller.signal.aborted) {
      onState("connecting");
      try {
        const extra = { Accept: "text/event-stream" };
        if (lastId !== null) extra["Last-Event-ID"] = lastId;
        const response = await fetch(path, { headers: headers(extra), signal: controller.signal });
        if (!response.ok) {
          const error = await errorOf(response);
          if ([401, 403, 404].includes(error.status)) {
            onState("off");
            onError(error);
            return;
          }
          throw error;
        }
        onState("live");
        pause = 500;
        for await (const event of sseEvents(response)) {
          if (event.id !== null) lastId = event.id;
          onEvent(event);
        }
      } catch (error) {
        if (controller.signal.aborted) return;
      }
      onState("down");
      await new Promise((resolve) => setTimeout(resolve, pause));
      pause = Math.min(pause * 2, 8000);
    }
  })();
  return () => controller.abort();
}
