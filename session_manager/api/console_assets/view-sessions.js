// #/sessions: live sessions as they change, then the ended ones with their reason. Filters by
// status, user and service live in the address (#/sessions?status=Active&user=alice).

import { ago, badge, duration, h, message, parseTime, replaceChildren, shortId, timeElement } from "./dom.js";
import { live } from "./live.js";

const STATUSES = ["Creating", "WaitingForServices", "Ready", "Active", "Terminating", "Terminated"];
const LIVE = new Set(["Creating", "WaitingForServices", "Ready", "Active"]);
const TICK_MS = 1000;
const MAX_ROWS = 500; // rows drawn per table: a page of thousands would be redrawn every second

export function renderSessions(params) {
  const filters = {
    status: params.get("status") || "",
    user: params.get("user") || "",
    service: params.get("service") || "",
  };

  const statusSelect = h(
    "select",
    { id: "filter-status", name: "status" },
    h("option", { value: "" }, "Any status"),
    h("option", { value: "live" }, "Live (not ended)"),
    STATUSES.map((status) => h("option", { value: status }, status)),
  );
  statusSelect.value = filters.status;
  const userInput = h("input", { id: "filter-user", type: "search", value: filters.user, placeholder: "user identity", autocomplete: "off" });
  const serviceInput = h("input", { id: "filter-service", type: "search", value: filters.service, placeholder: "service id", autocomplete: "off" });

  const summary = h("p", { class: "summary", role: "status", "aria-live": "polite" });
  const liveBody = h("tbody");
  const endedBody = h("tbody");
  const liveTable = table("Live sessions", liveBody, false);
  const endedTable = table("Ended sessions", endedBody, true);
  const notices = h("div");

  function onFilter() {
    filters.status = statusSelect.value;
    filters.user = userInput.value.trim();
    filters.service = serviceInput.value.trim();
    const query = new URLSearchParams(Object.entries(filters).filter(([, v]) => v)).toString();
    history.replaceState(null, "", `#/sessions${query ? `?${query}` : ""}`);
    draw();
  }
  for (const control of [statusSelect, userInput, serviceInput]) control.addEventListener("input", onFilter);

  function matches(view) {
    if (filters.status === "live" && !LIVE.has(view.status)) return false;
    if (filters.status && filters.status !== "live" && view.status !== filters.status) return false;
    if (filters.user && !view.user_identity.toLowerCase().includes(filters.user.toLowerCase())) return false;
    if (filters.service) {
      const wanted = filters.service.toLowerCase();
      const hit = view.services.some(
        (slot) => slot.service_id.toLowerCase().includes(wanted) || slot.requirement.toLowerCase().includes(wanted),
      );
      if (!hit) return false;
    }
    return true;
  }

  function draw() {
    const now = Date.now();
    const all = [...live.sessions.values()];
    const shown = all.filter(matches);
    const running = shown.filter((view) => view.status !== "Terminated");
    const ended = shown.filter((view) => view.status === "Terminated");
    running.sort((a, b) => b.created_at.localeCompare(a.created_at));
    ended.sort((a, b) => (b.terminated_at || "").localeCompare(a.terminated_at || ""));
    const liveCount = all.filter((view) => view.status !== "Terminated").length;
    summary.textContent =
      `${liveCount} live, ${all.length - liveCount} ended` +
      (shown.length !== all.length ? ` · ${shown.length} match the filters` : "");
    const cut = running.length > MAX_ROWS ? emptyRow(6, `Showing the newest ${MAX_ROWS} of ${running.length}: filter to narrow them.`) : null;
    replaceChildren(liveBody, running.length ? running.slice(0, MAX_ROWS).map((view) => row(view, now, false)) : emptyRow(6, "No live session."), cut);
    replaceChildren(endedBody, ended.length ? ended.slice(0, MAX_ROWS).map((view) => row(view, now, true)) : emptyRow(6, "No ended session."));
    replaceChildren(notices, live.loadError ? message("error", `Sessions could not be read: ${live.loadError.message}`) : null);
  }

  const element = h(
    "section",
    { class: "view", "aria-labelledby": "sessions-title" },
    h("div", { class: "view-head" }, h("h1", { id: "sessions-title" }, "Sessions"), summary),
    h(
      "form",
      { class: "filters", role: "search", "aria-label": "Filter sessions", onsubmit: (event) => event.preventDefault() },
      field("filter-status", "Status", statusSelect),
      field("filter-user", "User", userInput),
      field("filter-service", "Service", serviceInput),
    ),
    notices,
    liveTable,
    endedTable,
  );

  draw();
  const unsubscribe = live.subscribe((what) => {
    if (what === "sessions") draw();
  });
  const ticker = setInterval(draw, TICK_MS); // ages move on
  return { element, leave: () => (unsubscribe(), clearInterval(ticker)) };
}

function field(id, label, control) {
  return h("div", { class: "field" }, h("label", { for: id }, label), control);
}

function table(caption, body, ended) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { class: "data sessions-table", "data-table": ended ? "ended" : "live" },
      h("caption", {}, caption),
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          h("th", { scope: "col" }, "Session"),
          h("th", { scope: "col" }, "Status"),
          h("th", { scope: "col" }, ended ? "Lasted" : "Age"),
          h("th", { scope: "col" }, "User"),
          h("th", { scope: "col" }, "Services"),
          h("th", { scope: "col" }, ended ? "Reason" : "Ready in"),
        ),
      ),
      body,
    ),
  );
}

function emptyRow(columns, text) {
  return h("tr", { class: "empty" }, h("td", { colspan: columns }, text));
}

function row(view, now, ended) {
  const created = parseTime(view.created_at);
  const lasted = ended ? parseTime(view.terminated_at) - created : now - created;
  return h(
    "tr",
    { dataset: { sessionId: view.session_id } },
    h(
      "td",
      { "data-label": "Session" },
      h("a", { href: `#/sessions/${encodeURIComponent(view.session_id)}`, class: "mono", title: view.session_id, "data-focus-key": `s-${view.session_id}` }, shortId(view.session_id)),
    ),
    h("td", { "data-label": "Status" }, badge(view.status)),
    h("td", { "data-label": ended ? "Lasted" : "Age" }, ended ? duration(lasted) : timeElement(view.created_at, duration(lasted))),
    h("td", { "data-label": "User" }, view.user_identity, view.user_name ? h("span", { class: "muted" }, ` (${view.user_name})`) : null, clientMark(view)),
    h("td", { "data-label": "Services" }, servicesCell(view)),
    ended
      ? h("td", { "data-label": "Reason", class: "reason" }, view.reason || "–")
      : h("td", { "data-label": "Ready in" }, view.ready_ms === null ? "–" : duration(view.ready_ms)),
  );
}

function clientMark(view) {
  if (!view.client || view.status === "Terminated") return null;
  if (view.client.joined) return h("span", { class: "dot dot-on", title: `in the room since ${ago(view.client.joined_at)}` }, " in room");
  return null;
}

function servicesCell(view) {
  if (!view.services.length) return h("span", { class: "muted" }, "none");
  return h(
    "ul",
    { class: "chips" },
    view.services.map((slot) =>
      h(
        "li",
        { class: `chip chip-${slot.state}`, dataset: { service: slot.service_id, state: slot.state } },
        h("span", { class: "chip-name" }, slot.service_id),
        h("span", { class: "chip-state" }, slot.state),
        slot.join_ms !== null ? h("span", { class: "chip-time" }, `in ${duration(slot.join_ms)}`) : null,
        slot.redispatches ? h("span", { class: "chip-time" }, `${slot.redispatches} redispatch${slot.redispatches > 1 ? "es" : ""}`) : null,
      ),
    ),
  );
}
