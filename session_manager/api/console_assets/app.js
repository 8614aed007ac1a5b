// The console's shell: the address of each view (#/sessions, #/sessions/{id}, #/services,
// #/events, #/try), the API key prompt, and the stream indicator in the top bar.

import { api, apiKey, ApiError, onUnauthorized } from "./api.js";
import { live } from "./live.js";
import { renderEvents } from "./view-events.js";
import { renderServices } from "./view-services.js";
import { renderSession } from "./view-session.js";
import { renderSessions } from "./view-sessions.js";
import { renderTry } from "./view-try.js";

const main = document.getElementById("main");
const streamState = document.getElementById("stream-state");
const keyDialog = document.getElementById("key-dialog");
const keyForm = document.getElementById("key-form");
const keyInput = document.getElementById("key-input");
const keyError = document.getElementById("key-error");
const keyButton = document.getElementById("key-button");

const VIEWS = [
  [/^\/sessions\/([^/?]+)$/, (match) => renderSession(decodeURIComponent(match[1])), "sessions"],
  [/^\/sessions(\?.*)?$/, (match) => renderSessions(new URLSearchParams(match[1] || "")), "sessions"],
  [/^\/services$/, () => renderServices(), "services"],
  [/^\/events(\?.*)?$/, (match) => renderEvents(new URLSearchParams(match[1] || "")), "events"],
  [/^\/try$/, () => renderTry(), "try"],
];

let leaveView = null;
let started = false;

function route() {
  const path = location.hash.replace(/^#/, "") || "/sessions";
  if (leaveView) leaveView();
  leaveView = null;
  for (const [pattern, render, name] of VIEWS) {
    const match = path.match(pattern);
    if (!match) continue;
    for (const link of document.querySelectorAll(".nav a")) {
      if (link.dataset.view === name) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    const view = render(match);
    main.replaceChildren(view.element);
    leaveView = view.leave;
    const heading = main.querySelector("h1");
    document.title = `${heading ? heading.textContent : "Console"} · Session Manager`;
    return;
  }
  location.replace("#/sessions");
}

function showStream() {
  const labels = {
    connecting: ["Connecting…", "pending"],
    live: ["Live", "live"],
    retrying: ["Reconnecting…", "pending"],
    polling: ["Polling every 3 s", "pending"],
    refused: ["Event stream refused", "down"],
  };
  const [text, kind] = labels[live.streamState] || [live.streamState, "pending"];
  streamState.textContent = text;
  streamState.dataset.state = kind;
  streamState.title = live.streamProblem || "";
}

function askForKey(problem) {
  keyError.textContent = problem || "";
  streamState.textContent = "Needs an API key";
  streamState.dataset.state = "pending";
  if (!keyDialog.open) keyDialog.showModal();
  keyInput.focus();
}

keyForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = keyInput.value.trim();
  if (key.length < 16) {
    keyError.textContent = "A key is at least 16 characters.";
    return;
  }
  apiKey.set(key);
  try {
    await api.sessions("?limit=1");
  } catch (failure) {
    if (failure instanceof ApiError && failure.status === 401) {
      apiKey.set(null);
      keyError.textContent = "This key is not valid here. Try another.";
      keyInput.select();
      return;
    }
  }
  keyInput.value = "";
  keyDialog.close();
  start();
});

// The dialog cannot be dismissed without a key: nothing works without one.
keyDialog.addEventListener("cancel", (event) => event.preventDefault());

keyButton.addEventListener("click", () => {
  apiKey.set(null);
  live.stop();
  started = false;
  askForKey("");
});

onUnauthorized(() => {
  const hadKey = Boolean(apiKey.get());
  if (hadKey) apiKey.set(null);
  started = false;
  live.stop();
  askForKey(hadKey ? "The manager refused the key: enter one again." : "");
});

apiKey.onChange(() => {
  keyButton.hidden = !apiKey.get();
});

document.getElementById("skip-link").addEventListener("click", (event) => {
  event.preventDefault();
  main.focus();
});

async function start() {
  try {
    await api.sessions("?limit=1");
  } catch (failure) {
    if (failure instanceof ApiError && failure.status === 401) return; // the prompt is open
  }
  if (started) return;
  started = true;
  keyButton.hidden = !apiKey.get();
  await live.start();
  route();
}

// The manager's own health (GET /health, open): a banner names the part that is down.
const healthBanner = document.getElementById("health-banner");
const HEALTH_POLL_MS = 5000;
async function checkHealth() {
  let problems = [];
  try {
    const health = await api.health();
    problems = health.status === "healthy" ? [] : (health.problems || []).map((p) => `${p.component}: ${p.reason}`);
  } catch {
    problems = ["the manager does not answer"];
  }
  healthBanner.hidden = problems.length === 0;
  healthBanner.textContent = problems.length ? `The manager is unhealthy: ${problems.join("; ")}` : "";
}
checkHealth();
setInterval(checkHealth, HEALTH_POLL_MS);

live.subscribe((what) => {
  if (what === "stream") showStream();
});
window.addEventListener("hashchange", route);
showStream();
route();
start();
