// #/try: the API document's JavaScript example, made real. Choose services, create a session
// (waiting until it is Ready), join its room with livekit-client, send "ping" on the data
// channel until a service answers "pong", and see how long each step took. The microphone is
// optional; audio a service publishes plays. The trial outlives the view: going to the
// session's page and back keeps the room joined.

import { api } from "./api.js";
import { badge, duration, h, message, replaceChildren } from "./dom.js";
import { live } from "./live.js";

const PING = "ping";
const PONG = "pong";
const PING_EVERY_MS = 300; // a service hears data only once it has joined: early pings repeat
const FIRST_PONG_TIMEOUT_MS = 20_000;

let trial = null; // the one trial of this tab: { sessionId, room, steps, log, state, ... }
const trialListeners = new Set();
const changed = () => trialListeners.forEach((listener) => listener());

function step(name) {
  const entry = { name, state: "running", started: performance.now(), ms: null, note: "" };
  trial.steps.push(entry);
  changed();
  return {
    done(note = "") {
      entry.state = "done";
      entry.ms = performance.now() - entry.started;
      entry.note = note;
      changed();
    },
    failed(note) {
      entry.state = "failed";
      entry.ms = performance.now() - entry.started;
      entry.note = note;
      changed();
    },
  };
}

function note(direction, text) {
  trial.log.unshift({ at: new Date(), direction, text });
  trial.log.length = Math.min(trial.log.length, 50);
  changed();
}

async function runTrial({ services, userIdentity, microphone }) {
  trial = { sessionId: null, room: null, steps: [], log: [], state: "running", error: null, pending: [], audio: [], needsAudioStart: false };
  changed();
  let current = step("Create the session and wait until it is Ready");
  let created;
  try {
    created = await api.createSession({ user_identity: userIdentity, user_name: "Console trial", required_services: services, wait_until_ready: true });
    trial.sessionId = created.session_id;
    current.done(`status ${created.status}`);
  } catch (failure) {
    current.failed(failure.message);
    return finish("failed", failure.message);
  }

  current = step("Load livekit-client");
  let sdk;
  try {
    sdk = await import("./livekit-client.esm.mjs");
    current.done(`version ${sdk.version}`);
  } catch (failure) {
    current.failed(String(failure));
    return finish("failed", "livekit-client could not be loaded");
  }
  const { Room, RoomEvent, Track } = sdk;

  current = step("Join the room");
  const room = new Room({ adaptiveStream: true, dynacast: true });
  trial.room = room;
  room.on(RoomEvent.DataReceived, (payload, participant) => onData(new TextDecoder().decode(payload), participant));
  room.on(RoomEvent.ParticipantConnected, (participant) => note("room", `${participant.identity} is in the room`));
  room.on(RoomEvent.ParticipantDisconnected, (participant) => note("room", `${participant.identity} left the room`));
  room.on(RoomEvent.TrackSubscribed, (track, _publication, participant) => {
    if (track.kind !== Track.Kind.Audio) return;
    const element = track.attach();
    element.dataset.participant = participant.identity;
    trial.audio.push(element);
    note("room", `playing audio from ${participant.identity}`);
  });
  room.on(RoomEvent.AudioPlaybackStatusChanged, () => {
    trial.needsAudioStart = !room.canPlaybackAudio;
    changed();
  });
  room.on(RoomEvent.Disconnected, (reason) => {
    if (trial && trial.room === room) {
      trial.state = trial.state === "ended" ? "ended" : "left";
      note("room", `disconnected${reason !== undefined ? ` (${reason})` : ""}`);
    }
  });
  try {
    await room.connect(created.livekit_url, created.access_token);
    const others = [...room.remoteParticipants.values()].map((p) => p.identity);
    current.done(others.length ? `with ${others.join(", ")}` : "");
  } catch (failure) {
    current.failed(failure.message || String(failure));
    return finish("failed", "the room could not be joined");
  }

  if (microphone) {
    const mic = step("Turn the microphone on");
    try {
      await room.localParticipant.setMicrophoneEnabled(true);
      mic.done();
    } catch (failure) {
      mic.failed(failure.message || String(failure));
    }
  }

  current = step('Send "ping" until "pong" comes back');
  trial.firstPong = current;
  const firstPingAt = performance.now();
  while (trial.firstPong && performance.now() - firstPingAt < FIRST_PONG_TIMEOUT_MS && trial.room === room) {
    await sendPing(false);
    await new Promise((resolve) => setTimeout(resolve, PING_EVERY_MS));
  }
  if (trial.firstPong) {
    trial.firstPong = null;
    current.failed(`no pong within ${FIRST_PONG_TIMEOUT_MS / 1000} s`);
    return finish("failed", "no service answered the ping");
  }
  return finish("connected", null);
}

function finish(state, error) {
  trial.state = state;
  trial.error = error;
  changed();
}

async function sendPing(measured) {
  const room = trial && trial.room;
  if (!room) return;
  if (measured) trial.pending = [performance.now()];
  else trial.pending.push(performance.now());
  try {
    await room.localParticipant.publishData(new TextEncoder().encode(PING), { reliable: true });
    note("out", PING);
  } catch (failure) {
    note("room", `ping not sent: ${failure.message || failure}`);
  }
}

function onData(text, participant) {
  const from = participant ? participant.identity : "someone not yet announced";
  if (text !== PONG) {
    note("in", `${JSON.stringify(text.slice(0, 80))} from ${from}`);
    return;
  }
  const sent = trial.pending.shift();
  const rtt = sent === undefined ? null : performance.now() - sent;
  if (trial.firstPong) {
    const first = trial.firstPong;
    trial.firstPong = null;
    trial.pending = [];
    first.done(`answered by ${from}`);
  }
  trial.lastPong = { from, rtt };
  note("in", `${PONG} from ${from}${rtt === null ? "" : ` · ${duration(rtt)} after the ping`}`);
}

async function leave() {
  const current = trial; // a new trial may start while this one disconnects
  if (!current || !current.room) return;
  const room = current.room;
  current.room = null;
  current.firstPong = null;
  for (const element of current.audio) element.remove();
  await room.disconnect();
  if (current.state !== "ended") current.state = "left";
  changed();
}

async function endSession() {
  if (!trial || !trial.sessionId) return;
  await leave();
  try {
    await api.endSession(trial.sessionId);
    trial.state = "ended";
    note("room", "session ended");
  } catch (failure) {
    note("room", `the session could not be ended: ${failure.message}`);
  }
  changed();
}

export function renderTry() {
  const chosen = new Set();
  let defaulted = false;
  const serviceList = h("div", { class: "checks", id: "try-services" });
  const userInput = h("input", { id: "try-user", type: "text", value: `console-${Math.random().toString(36).slice(2, 8)}`, autocomplete: "off", maxlength: 128 });
  const micInput = h("input", { id: "try-mic", type: "checkbox" });
  const startButton = h("button", { type: "submit", class: "button primary", id: "try-start" }, "Create session and join");
  const controls = h("div", { class: "try-controls" });
  const stepsList = h("ol", { class: "steps", id: "try-steps", "aria-live": "polite" });
  const logList = h("ol", { class: "try-log", id: "try-log", "aria-label": "Data channel and room messages, newest first" });
  const audioBox = h("div", { class: "audio-box", "aria-hidden": "true" });
  const notices = h("div");

  function drawServices() {
    const services = [...live.services.values()].sort((a, b) => a.service_id.localeCompare(b.service_id));
    if (!defaulted && services.length) {
      defaulted = true;
      // A healthy pong if there is one: it is what the page can show a round trip with.
      const usable = services.filter((view) => view.status === "Healthy" && !view.draining);
      const pong = usable.filter((view) => /pong/i.test(view.service_id) || /pong/i.test(String(view.metadata?.type || "")));
      for (const view of pong.length ? pong.slice(0, 1) : usable.slice(0, 1)) chosen.add(view.service_id);
    }
    replaceChildren(
      serviceList,
      services.length
        ? services.map((view) => {
            const id = `try-svc-${view.service_id}`;
            const box = h("input", { type: "checkbox", id, value: view.service_id, checked: chosen.has(view.service_id), "data-focus-key": id });
            box.addEventListener("change", () => (box.checked ? chosen.add(view.service_id) : chosen.delete(view.service_id)));
            return h(
              "div",
              { class: "check" },
              box,
              h("label", { for: id }, h("span", { class: "mono" }, view.service_id), " ", badge(view.status), view.draining ? badge("draining") : null),
            );
          })
        : h("p", { class: "muted" }, "No microservice is registered: a session without services can still be tried."),
    );
  }

  function drawTrial() {
    const running = trial && trial.state === "running";
    startButton.disabled = Boolean(running);
    if (!trial) {
      replaceChildren(stepsList, h("li", { class: "muted" }, "Nothing tried yet."));
      replaceChildren(controls);
      replaceChildren(logList);
      return;
    }
    replaceChildren(
      stepsList,
      trial.steps.map((entry) =>
        h(
          "li",
          { class: `step step-${entry.state}`, dataset: { state: entry.state } },
          h("span", { class: "step-name" }, entry.name),
          h("span", { class: "step-time" }, entry.ms === null ? "…" : duration(entry.ms)),
          entry.note ? h("span", { class: "step-note" }, entry.note) : null,
        ),
      ),
    );
    const connected = Boolean(trial.room);
    replaceChildren(
      controls,
      trial.sessionId ? h("a", { href: `#/sessions/${encodeURIComponent(trial.sessionId)}`, class: "button", id: "try-session-link" }, "Open the session's page") : null,
      connected ? h("button", { type: "button", class: "button", id: "try-ping", "data-focus-key": "ping", onclick: () => sendPing(true) }, "Send ping") : null,
      connected && trial.needsAudioStart ? h("button", { type: "button", class: "button", onclick: () => trial.room.startAudio() }, "Play the audio") : null,
      connected ? h("button", { type: "button", class: "button", id: "try-leave", onclick: leave }, "Leave the room") : null,
      trial.sessionId && trial.state !== "ended" ? h("button", { type: "button", class: "button danger", id: "try-end", onclick: endSession }, "End the session") : null,
    );
    replaceChildren(
      notices,
      trial.error ? message("error", trial.error) : null,
      trial.lastPong ? h("p", { class: "pong", id: "try-pong", role: "status" }, badge("pong", "ok"), ` from ${trial.lastPong.from}`, trial.lastPong.rtt === null ? "" : ` in ${duration(trial.lastPong.rtt)}`) : null,
    );
    replaceChildren(
      logList,
      trial.log.map((entry) =>
        h("li", { class: `log-${entry.direction}` }, h("span", { class: "log-dir" }, { out: "→", in: "←", room: "·" }[entry.direction]), ` ${entry.text}`),
      ),
    );
    audioBox.replaceChildren(...trial.audio);
  }

  const form = h(
    "form",
    { class: "try-form", "aria-labelledby": "try-form-title" },
    h("h2", { id: "try-form-title" }, "1. Choose"),
    h("fieldset", {}, h("legend", {}, "Required services"), serviceList),
    h("div", { class: "field" }, h("label", { for: "try-user" }, "User identity"), userInput),
    h("div", { class: "check" }, micInput, h("label", { for: "try-mic" }, "Also publish my microphone (optional)")),
    h("div", { class: "actions" }, startButton),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (trial && trial.room) leave();
    const options = { services: [...chosen], userIdentity: userInput.value.trim() || "console-user", microphone: micInput.checked };
    runTrial(options).catch((failure) => finish("failed", `The trial stopped: ${failure.message || failure}`));
  });

  const element = h(
    "section",
    { class: "view", "aria-labelledby": "try-title" },
    h("div", { class: "view-head" }, h("h1", { id: "try-title" }, "Try a session")),
    h("p", { class: "lede" }, "Creates a real session with the services you choose, joins its room from this browser and pings them on the data channel. A service that answers \"ping\" with \"pong\" (examples/pong) shows the round trip."),
    h(
      "div",
      { class: "try-grid" },
      form,
      h(
        "div",
        { class: "try-result" },
        h("h2", {}, "2. What happened"),
        notices,
        stepsList,
        controls,
        h("h3", {}, "Messages"),
        logList,
        audioBox,
      ),
    ),
  );
  drawServices();
  drawTrial();
  const unsubscribe = live.subscribe((what) => {
    if (what === "services") drawServices();
  });
  trialListeners.add(drawTrial);
  return { element, leave: () => (unsubscribe(), trialListeners.delete(drawTrial)) };
}
