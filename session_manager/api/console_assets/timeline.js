// One session's events as the steps of a waterfall: create → room created → each dispatch
// (attempts, declines, redispatches) → each join → Ready → user joined → Active → end. Each step
// is a span [start, end] in milliseconds since the session was created; an open step (still
// going) ends at `now`.

import { parseTime } from "./dom.js";

export function timelineSteps(view, events, now = Date.now()) {
  const created = parseTime(view.created_at) ?? (events[0] ? parseTime(events[0].timestamp) : now);
  const at = (event) => parseTime(event.timestamp) - created;
  const endMs = view.terminated_at ? parseTime(view.terminated_at) - created : now - created;
  const steps = [];
  const add = (step) => steps.push({ kind: "step", detail: "", ...step });

  add({ label: "Session created", start: 0, end: 0, kind: "mark" });

  let roomAt = null;
  let readyAt = null;
  let userJoined = false;
  const openDispatches = new Map(); // requirement -> step
  for (const event of events) {
    const t = at(event);
    const data = event.data || {};
    switch (event.type) {
      case "SessionAdopted":
        add({ label: "Taken over by a restarted manager", start: t, end: t, kind: "mark", detail: data.outcome || "" });
        break;
      case "SessionStatusChanged":
        if (data.old === "Creating" && roomAt === null) {
          roomAt = t;
          add({ label: "Room created", start: 0, end: t });
        }
        if (data.new === "Active") {
          add({ label: "Active", start: t, end: t, kind: "mark user", detail: "the user and every service in the room" });
        }
        if (data.new === "WaitingForServices" && data.old !== "Creating") {
          add({ label: "Back to waiting for services", start: t, end: t, kind: "mark warn", detail: data.reason || "" });
        }
        if (data.new === "Terminating") {
          add({ label: "Ending", start: t, end: endMs, kind: "end", detail: data.reason || "", id: "ending" });
        }
        break;
      case "MicroserviceDispatched": {
        const redispatch = data.redispatches ? ` (redispatch ${data.redispatches})` : "";
        const step = {
          label: `Dispatch ${event.service_id}${redispatch}`,
          start: t,
          end: null,
          kind: "dispatch",
          detail: data.requirement && data.requirement !== event.service_id ? `for ${data.requirement}` : "",
        };
        add(step);
        openDispatches.set(data.requirement || event.service_id, steps[steps.length - 1]);
        break;
      }
      case "MicroserviceDispatchFailed": {
        const step = openDispatches.get(data.requirement || event.service_id);
        const outcome = data.declined ? "declined" : "failed";
        const attempts = data.attempts ? `after ${data.attempts} attempt${data.attempts > 1 ? "s" : ""}` : "";
        if (step && step.end === null) {
          step.end = t;
          step.kind = "dispatch failed";
          step.detail = [outcome, attempts, data.error].filter(Boolean).join(" · ");
        } else {
          add({ label: `Dispatch ${event.service_id} ${outcome}`, start: t, end: t, kind: "mark failed", detail: data.error || "" });
        }
        break;
      }
      case "MicroserviceJoined": {
        const step = openDispatches.get(data.requirement || event.service_id);
        if (step && step.end === null) {
          step.end = t;
          step.label = `${step.label} → joined`;
          step.detail = [step.detail, attemptsOf(view, event.service_id)].filter(Boolean).join(" · ");
          openDispatches.delete(data.requirement || event.service_id);
        } else {
          add({ label: `${event.service_id} joined`, start: t, end: t, kind: "mark" });
        }
        break;
      }
      case "MicroserviceLeft":
        add({ label: `${event.service_id} left`, start: t, end: t, kind: "mark warn" });
        break;
      case "SessionReady":
        readyAt = t;
        add({ label: "Ready", start: 0, end: t, kind: "ready", detail: "every service in the room" });
        break;
      case "ClientJoined":
        if (!userJoined) {
          userJoined = true;
          add({ label: "User joined", start: roomAt ?? 0, end: t, kind: "user", detail: data.identity ? `${data.identity}, from the room's creation` : "" });
        } else {
          add({ label: "User rejoined", start: t, end: t, kind: "mark user", detail: data.identity || "" });
        }
        break;
      case "ClientLeft":
        add({ label: `User ${data.identity || ""} left`.replace("  ", " "), start: t, end: t, kind: "mark warn" });
        break;
      case "SessionTerminated": {
        const ending = steps.find((step) => step.id === "ending");
        if (ending) ending.end = t;
        add({ label: "Ended", start: t, end: t, kind: "mark end", detail: data.reason || "" });
        break;
      }
      default:
        break;
    }
  }
  for (const step of steps) {
    if (step.end === null) {
      step.end = endMs;
      step.open = !view.terminated_at;
      step.detail = [step.detail, view.terminated_at ? "never joined" : "waiting"].filter(Boolean).join(" · ");
    }
  }
  // From the view, when the events are gone (older than the history the manager keeps).
  if (readyAt === null && view.ready_ms !== null && view.ready_ms !== undefined && !steps.some((s) => s.label === "Ready")) {
    add({ label: "Ready", start: 0, end: view.ready_ms, kind: "ready", detail: "from the session's view" });
  }
  add({ label: "Whole session", start: 0, end: endMs, kind: "total", open: !view.terminated_at });
  return steps;
}

function attemptsOf(view, serviceId) {
  const slot = (view.services || []).find((candidate) => candidate.service_id === serviceId);
  if (!slot || !slot.attempts) return "";
  return `${slot.attempts} join-room call${slot.attempts > 1 ? "s" : ""}`;
}
