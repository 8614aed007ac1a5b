// #/sessions/{id}: one session, its services, and the waterfall of its timeline, built from the
// session's own event stream (which ends after its SessionTerminated).

import { api, ApiError, openStream } from "./api.js";
import { badge, dateTime, duration, h, message, replaceChildren } from "./dom.js";
import { live } from "./live.js";
import { timelineSteps } from "./timeline.js";

const TICK_MS = 500;

export function renderSession(sessionId) {
  let view = live.sessions.get(sessionId) || null;
  const events = [];
  let streamNote = "";

  const head = h("div", { class: "view-head" });
  const facts = h("dl", { class: "facts" });
  const servicesBody = h("tbody");
  const waterfall = h("div", { class: "waterfall", role: "table", "aria-label": "Timeline of the session", id: "timeline" });
  const notices = h("div");
  const endButton = h("button", { type: "button", class: "button danger", id: "end-session" }, "End session");
  endButton.addEventListener("click", async () => {
    endButton.disabled = true;
    try {
      view = await api.endSession(sessionId);
      draw();
    } catch (failure) {
      replaceChildren(notices, message("error", `The session could not be ended: ${failure.message}`));
      endButton.disabled = false;
    }
  });

  function draw() {
    if (!view) {
      replaceChildren(head, h("h1", {}, "Session"), h("p", { class: "muted mono" }, sessionId));
      return;
    }
    const ended = view.status === "Terminated";
    replaceChildren(
      head,
      h("h1", {}, "Session ", h("span", { class: "mono title-id" }, sessionId)),
      h("div", { class: "head-actions" }, badge(view.status), ended ? null : endButton),
    );
    replaceChildren(
      facts,
      fact("User", view.user_identity + (view.user_name ? ` (${view.user_name})` : "")),
      fact("Room", h("span", { class: "mono" }, view.room_name)),
      fact("Created", dateTime(view.created_at)),
      fact("Ready after", view.ready_ms === null ? "–" : duration(view.ready_ms)),
      fact("User in the room", view.client && view.client.joined ? `yes, since ${dateTime(view.client.joined_at)}` : "no"),
      ended ? fact("Ended", dateTime(view.terminated_at)) : null,
      ended ? fact("Reason", view.reason || "–") : null,
    );
    replaceChildren(
      servicesBody,
      view.services.length
        ? view.services.map((slot) =>
            h(
              "tr",
              { dataset: { service: slot.service_id, state: slot.state } },
              h("td", { "data-label": "Requirement", class: "mono" }, slot.requirement),
              h("td", { "data-label": "Instance", class: "mono" }, slot.service_id),
              h("td", { "data-label": "State" }, badge(slot.state)),
              h("td", { "data-label": "Join time" }, slot.join_ms === null ? "–" : duration(slot.join_ms)),
              h("td", { "data-label": "Attempts" }, `${slot.attempts}` + (slot.redispatches ? ` · ${slot.redispatches} redispatched` : "")),
              h("td", { "data-label": "Declined by" }, slot.declined_by.length ? slot.declined_by.join(", ") : "–"),
              slot.error || slot.failover
                ? h("td", { "data-label": "Error", class: "reason" }, slot.error || `failover: ${slot.failover.cause}`)
                : h("td", { "data-label": "Error" }, "–"),
            ),
          )
        : h("tr", { class: "empty" }, h("td", { colspan: 7 }, "No service was asked for.")),
    );
    drawWaterfall();
  }

  function drawWaterfall() {
    if (!view) return;
    const steps = timelineSteps(view, events);
    const span = Math.max(1, ...steps.map((step) => step.end));
    const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) =>
      h("span", { class: "tick", "data-at": f }, duration(f * span)),
    );
    for (const tick of ticks) tick.style.left = `${tick.dataset.at * 100}%`;
    const rows = steps.map((step) => {
      const bar = h("span", { class: `bar ${step.kind.split(" ").map((k) => `bar-${k}`).join(" ")}${step.open ? " bar-open" : ""}` });
      bar.style.left = `${(step.start / span) * 100}%`;
      bar.style.width = step.end > step.start ? `${Math.max(0.4, ((step.end - step.start) / span) * 100)}%` : "";
      const mark = step.end === step.start;
      return h(
        "div",
        { class: "wf-row", role: "row", dataset: { step: step.label } },
        h("span", { class: "wf-label", role: "rowheader" }, step.label, step.detail ? h("span", { class: "wf-detail" }, step.detail) : null),
        h("span", { class: "wf-track", role: "cell", "aria-hidden": "true" }, bar),
        h("span", { class: "wf-time", role: "cell" }, mark ? `at ${duration(step.start)}` : duration(step.end - step.start), step.open ? "…" : ""),
      );
    });
    replaceChildren(
      waterfall,
      h("div", { class: "wf-row wf-axis", role: "row" }, h("span", { class: "wf-label", role: "columnheader" }, "Step"), h("span", { class: "wf-track", role: "columnheader" }, h("span", { class: "visually-hidden" }, "When"), ticks), h("span", { class: "wf-time", role: "columnheader" }, "Took")),
      rows,
      streamNote ? h("p", { class: "muted wf-note" }, streamNote) : null,
    );
  }

  const element = h(
    "section",
    { class: "view", "aria-labelledby": "session-title" },
    h("p", { class: "crumbs" }, h("a", { href: "#/sessions" }, "← All sessions")),
    head,
    notices,
    facts,
    h("h2", { id: "session-title" }, "Timeline"),
    h("p", { class: "muted" }, "Each step of the session, from its creation, with how long it took."),
    waterfall,
    h("h2", {}, "Services"),
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { class: "data" },
        h("thead", {}, h("tr", {}, ["Requirement", "Instance", "State", "Join time", "Attempts", "Declined by", "Error"].map((t) => h("th", { scope: "col" }, t)))),
        servicesBody,
      ),
    ),
  );

  async function load() {
    try {
      view = await api.session(sessionId);
      draw();
    } catch (failure) {
      const text = failure instanceof ApiError && failure.status === 404 ? "No such session (or it has been forgotten)." : failure.message;
      replaceChildren(notices, message("error", text));
    }
  }

  const stopStream = openStream(`/api/v1/sessions/${encodeURIComponent(sessionId)}/events`, {
    lastEventId: 0,
    endsByItself: true,
    onEvent: (event) => {
      if (event.type === "EventsDropped") streamNote = "Some of this session's events are no longer kept: the timeline may miss steps.";
      else events.push(event);
      drawWaterfall();
    },
    onState: (state, failure) => {
      if (state === "refused" && failure && failure.status !== 404) streamNote = `Events: ${failure.message}`;
      drawWaterfall();
    },
  });

  const unsubscribe = live.subscribe((what, id) => {
    if (what === "sessions" && (id === sessionId || id === undefined) && live.sessions.has(sessionId)) {
      view = live.sessions.get(sessionId);
      draw();
    }
  });
  const ticker = setInterval(() => {
    if (view && view.status !== "Terminated") drawWaterfall();
  }, TICK_MS);
  draw();
  load();
  return { element, leave: () => (stopStream(), unsubscribe(), clearInterval(ticker)) };
}

function fact(term, value) {
  return h("div", { class: "fact" }, h("dt", {}, term), h("dd", {}, value));
}
