// The manager's HTTP API, as the console calls it: the API key (kept in this tab only), JSON
// calls that turn the error envelope into an ApiError, and Server-Sent Events read with fetch()
// so that the key travels in the Authorization header (EventSource cannot send one).

const KEY_STORAGE = "session-manager-console.api-key";
const CALL_TIMEOUT_MS = 15_000;
const MAX_FRAME_CHARS = 1_048_576; // an SSE frame longer than this is not one the manager sends

export class ApiError extends Error {
  constructor(status, error, message) {
    super(message);
    this.status = status;
    this.error = error;
  }
}

const keyListeners = new Set();

export const apiKey = {
  get() {
    return sessionStorage.getItem(KEY_STORAGE);
  },
  set(key) {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    for (const listener of keyListeners) listener();
  },
  onChange(listener) {
    keyListeners.add(listener);
  },
};

// Called with the ApiError of every 401, so the page can ask for a key.
let unauthorizedHandler = () => {};
export function onUnauthorized(handler) {
  unauthorizedHandler = handler;
}

function headers(extra = {}) {
  const key = apiKey.get();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function errorOf(response) {
  let error = `HTTP ${response.status}`;
  let text = response.statusText || error;
  try {
    const body = await response.json();
    if (body && typeof body.message === "string") {
      error = body.error || error;
      text = body.message;
    }
  } catch {
    // not the envelope: the status says enough
  }
  const failure = new ApiError(response.status, error, text);
  if (response.status === 401) unauthorizedHandler(failure);
  return failure;
}

export async function call(method, path, body) {
  const init = { method, headers: headers(), signal: AbortSignal.timeout(CALL_TIMEOUT_MS) };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (failure) {
    const why = failure.name === "TimeoutError" ? "no answer in time" : "the manager cannot be reached";
    throw new ApiError(0, "Unreachable", why);
  }
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

export const api = {
  health: () => fetch("/health", { signal: AbortSignal.timeout(CALL_TIMEOUT_MS) }).then((r) => r.json()),
  sessions: (query = "") => call("GET", `/api/v1/sessions${query}`),
  session: (id) => call("GET", `/api/v1/sessions/${encodeURIComponent(id)}`),
  endSession: (id) => call("DELETE", `/api/v1/sessions/${encodeURIComponent(id)}`),
  createSession: (body) => call("POST", "/api/v1/create-session", body),
  services: () => call("GET", "/api/v1/microservices"),
  drain: (id) => call("POST", `/api/v1/microservices/${encodeURIComponent(id)}/drain`),
  undrain: (id) => call("PUT", `/api/v1/microservices/${encodeURIComponent(id)}`, { draining: false }),
  eventPage: (query) => call("GET", `/api/v1/events?${query}`),
};

// One SSE stream, resumed after the last event it delivered when it breaks. `onEvent` gets each
// event object; `onState` gets "live", "retrying" (with the error) or "ended" (the server closed
// a stream that ends, a session's after its SessionTerminated). Returns a function that stops it.
export function openStream(path, { lastEventId = null, onEvent, onState, endsByItself = false }) {
  const controller = new AbortController();
  let last = lastEventId;
  let delay = 1000;

  async function once() {
    const extra = { Accept: "text/event-stream" };
    if (last !== null) extra["Last-Event-ID"] = String(last);
    const response = await fetch(path, { headers: headers(extra), signal: controller.signal });
    if (!response.ok) throw await errorOf(response);
    onState("live");
    delay = 1000;
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = parseFrame(frame);
        if (event) {
          if (typeof event.id === "number") last = event.id;
          onEvent(event);
        }
      }
      if (buffer.length > MAX_FRAME_CHARS) throw new ApiError(0, "BadStream", "a frame too long");
    }
  }

  (async () => {
    while (!controller.signal.aborted) {
      try {
        await once();
        if (endsByItself) {
          onState("ended");
          return;
        }
      } catch (failure) {
        if (controller.signal.aborted) return;
        if (failure instanceof ApiError && [401, 403, 404].includes(failure.status)) {
          onState("refused", failure);
          return;
        }
        onState("retrying", failure);
      }
      await sleep(delay, controller.signal);
      delay = Math.min(delay * 2, 10_000);
    }
  })();
  return () => controller.abort();
}

function parseFrame(frame) {
  let data = "";
  for (const line of frame.split("\n")) {
    if (line.startsWith("data:")) data += line.slice(line[5] === " " ? 6 : 5);
  }
  if (!data) return null; // a keep-alive comment
  try {
    return JSON.parse(data);
  } catch {
    return null;
  }
}

export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}
