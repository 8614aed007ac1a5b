// #/events: the event stream, newest first, with filters (type, session, service). While the
// person scrolls down the list (or presses Pause), new events wait above it; they appear when
// the list is back at its top, or on Resume.

import { badge, clock, h, replaceChildren, shortId } from "./dom.js";
import { live } from "./live.js";

const SHOWN = 300;
const TYPES = [
  "SessionCreated", "SessionAdopted", "SessionStatusChanged", "SessionReady", "SessionTerminated",
  "MicroserviceDispatched", "MicroserviceDispatchFailed", "MicroserviceJoined", "MicroserviceLeft",
  "ClientJoined", "ClientLeft", "MicroserviceRegistered", "MicroserviceUpdated",
  "MicroserviceDeregistered", "MicroserviceHealthChanged", "EventsDropped",
];

export function renderEvents(params) {
  const filters = { type: params.get("type") || "", session: params.get("session") || "", service: params.get("service") || "" };
  let paused = false;
  let pausedByHand = false;
  let shownUpTo = live.events.length ? live.events[live.events.length - 1].id : 0;

  const typeSelect = h("select", { id: "filter-type" }, h("option", { value: "" }, "Any type"), TYPES.map((t) => h("option", { value: t }, t)));
  typeSelect.value = filters.type;
  const sessionInput = h("input", { id: "filter-session", type: "search", value: filters.session, placeholder: "session id", autocomplete: "off" });
  const serviceInput = h("input", { id: "filter-service-id", type: "search", value: filters.service, placeholder: "service id", autocomplete: "off" });
  const list = h("ol", { class: "event-list", id: "event-list", tabindex: "0", "aria-label": "Events, newest first" });
  const state = h("p", { class: "pause-state", role: "status", "aria-live": "polite" });
  const pauseButton = h("button", { type: "button", class: "button", id: "pause-events" }, "Pause");

  function matches(event) {
    if (filters.type && event.type !== filters.type) return false;
    if (filters.session && !(event.session_id || "").includes(filters.session)) return false;
    if (filters.service && !(event.service_id || "").includes(filters.service)) return false;
    return true;
  }

  function onFilter() {
    filters.type = typeSelect.value;
    filters.session = sessionInput.value.trim();
    filters.service = serviceInput.value.trim();
    const query = new URLSearchParams(Object.entries(filters).filter(([, v]) => v)).toString();
    history.replaceState(null, "", `#/events${query ? `?${query}` : ""}`);
    draw(true);
  }
  for (const control of [typeSelect, sessionInput, serviceInput]) control.addEventListener("input", onFilter);

  function waiting() {
    return live.events.filter((event) => event.id > shownUpTo && matches(event)).length;
  }

  function showState() {
    if (!paused) {
      state.textContent = live.streamState === "live" ? "Showing new events as they come." : "";
      pauseButton.textContent = "Pause";
      return;
    }
    const count = waiting();
    state.textContent = `Paused${pausedByHand ? "" : " while you scroll"}: ${count} new event${count === 1 ? "" : "s"} waiting.`;
    pauseButton.textContent = "Resume";
  }

  function draw(force = false) {
    if (paused && !force) {
      showState();
      return;
    }
    if (live.events.length) shownUpTo = Math.max(shownUpTo, live.events[live.events.length - 1].id);
    const shown = live.events.filter((event) => event.id <= shownUpTo && matches(event)).slice(-SHOWN).reverse();
    replaceChildren(list, shown.length ? shown.map(item) : h("li", { class: "empty" }, live.streamProblem ? `No events: ${live.streamProblem}.` : "No event yet."));
    showState();
  }

  function setPaused(value, byHand) {
    paused = value;
    pausedByHand = value && byHand;
    if (!paused) draw(true);
    showState();
  }

  pauseButton.addEventListener("click", () => {
    if (paused) {
      list.scrollTop = 0;
      setPaused(false, true);
    } else setPaused(true, true);
  });
  list.addEventListener("scroll", () => {
    if (pausedByHand) return;
    const away = list.scrollTop > 8;
    if (away !== paused) setPaused(away, false);
  });

  const element = h(
    "section",
    { class: "view", "aria-labelledby": "events-title" },
    h("div", { class: "view-head" }, h("h1", { id: "events-title" }, "Events"), h("div", { class: "head-actions" }, state, pauseButton)),
    h(
      "form",
      { class: "filters", role: "search", "aria-label": "Filter events", onsubmit: (event) => event.preventDefault() },
      field("filter-type", "Type", typeSelect),
      field("filter-session", "Session", sessionInput),
      field("filter-service-id", "Service", serviceInput),
    ),
    list,
  );
  draw(true);
  const unsubscribe = live.subscribe((what) => {
    if (what === "event" || what === "events" || what === "stream") draw();
  });
  return { element, leave: unsubscribe };
}

function field(id, label, control) {
  return h("div", { class: "field" }, h("label", { for: id }, label), control);
}

function item(event) {
  const data = event.data || {};
  const text = JSON.stringify(data);
  return h(
    "li",
    { class: "event", dataset: { type: event.type, id: event.id } },
    h("span", { class: "event-time mono" }, h("time", { datetime: event.timestamp }, clock(event.timestamp))),
    h("span", { class: "event-type" }, badge(event.type, event.type.startsWith("Session") || event.type.startsWith("Client") ? "session-event" : "service-event")),
    h(
      "span",
      { class: "event-about" },
      event.session_id ? h("a", { href: `#/sessions/${encodeURIComponent(event.session_id)}`, class: "mono", title: event.session_id }, shortId(event.session_id)) : null,
      event.service_id ? h("span", { class: "mono" }, event.service_id) : null,
    ),
    text && text !== "{}"
      ? h("details", { class: "event-data" }, h("summary", {}, summaryOf(event.type, data)), h("pre", {}, JSON.stringify(data, null, 2)))
      : h("span", { class: "event-data muted" }, "–"),
  );
}

function summaryOf(type, data) {
  if (type === "SessionStatusChanged") return `${data.old} → ${data.new}${data.reason ? ` (${data.reason})` : ""}`;
  if (type === "SessionTerminated") return data.reason || "ended";
  if (type === "SessionReady") return `ready in ${Math.round(data.ready_ms)} ms`;
  if (type === "MicroserviceJoined" && data.join_ms !== undefined) return `joined in ${Math.round(data.join_ms)} ms`;
  if (type === "MicroserviceDispatchFailed") return `${data.declined ? "declined" : "failed"}: ${data.error || ""}`;
  if (type === "MicroserviceHealthChanged") return `${data.old} → ${data.new}${data.error ? ` (${data.error})` : ""}`;
  if (type === "SessionCreated") {
    const services = (data.required_services || []).join(", ");
    return `user ${data.user_identity}${services ? ` · needs ${services}` : " · no service"}`;
  }
  if (type === "MicroserviceDispatched") {
    const to = data.agent_name ? `agent ${data.agent_name}` : data.endpoint || "";
    return `for ${data.requirement} → ${to}${data.redispatches ? ` · redispatch ${data.redispatches}` : ""}`;
  }
  if (type === "MicroserviceRegistered" || type === "MicroserviceUpdated") {
    return [data.status, data.draining ? "draining" : null, data.endpoint].filter(Boolean).join(" · ");
  }
  if (type === "ClientJoined" || type === "ClientLeft") return data.identity || "";
  if (type === "MicroserviceLeft") return `left ${data.requirement || "the room"}`;
  if (type === "EventsDropped") return `${data.count ?? "some"} events missed`;
  const text = JSON.stringify(data);
  return text.length > 80 ? `${text.slice(0, 77)}…` : text;
}
