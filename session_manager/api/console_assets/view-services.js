// #/services: the registry. Health with the last error, load against max_sessions, draining,
// the last health check; a button to drain an instance or take it back into service.

import { api } from "./api.js";
import { ago, badge, h, message, replaceChildren, timeElement } from "./dom.js";
import { live } from "./live.js";

export function renderServices() {
  const body = h("tbody");
  const notices = h("div", { "aria-live": "polite" });
  const summary = h("p", { class: "summary" });
  const pending = new Set(); // service ids with a drain or undrain on its way

  async function toggle(view) {
    pending.add(view.service_id);
    draw();
    try {
      const changed = view.draining ? await api.undrain(view.service_id) : await api.drain(view.service_id);
      live.services.set(changed.service_id, changed);
      replaceChildren(notices, message("ok", `${changed.service_id} ${changed.draining ? "is draining: it gets no new session" : "takes new sessions again"}.`));
    } catch (failure) {
      replaceChildren(notices, message("error", `${view.service_id} could not be changed: ${failure.message}`));
    } finally {
      pending.delete(view.service_id);
      draw();
      live.loadServices();
    }
  }

  function draw() {
    const services = [...live.services.values()].sort((a, b) => a.service_id.localeCompare(b.service_id));
    const healthy = services.filter((view) => view.status === "Healthy" && !view.draining).length;
    summary.textContent = `${services.length} registered, ${healthy} healthy and taking sessions`;
    replaceChildren(
      body,
      services.length
        ? services.map((view) => row(view, pending.has(view.service_id), () => toggle(view)))
        : h("tr", { class: "empty" }, h("td", { colspan: 7 }, "No microservice is registered.")),
    );
  }

  const element = h(
    "section",
    { class: "view", "aria-labelledby": "services-title" },
    h("div", { class: "view-head" }, h("h1", { id: "services-title" }, "Services"), summary),
    notices,
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { class: "data services-table" },
        h("caption", { class: "visually-hidden" }, "Registered microservices"),
        h("thead", {}, h("tr", {}, ["Service", "Health", "Load", "Draining", "Last check", "Registered", "Action"].map((t) => h("th", { scope: "col" }, t)))),
        body,
      ),
    ),
  );
  draw();
  const unsubscribe = live.subscribe((what) => {
    if (what === "services") draw();
  });
  const ticker = setInterval(draw, 1000);
  return { element, leave: () => (unsubscribe(), clearInterval(ticker)) };
}

function row(view, busy, onToggle) {
  const type = view.metadata && typeof view.metadata.type === "string" ? view.metadata.type : null;
  const max = view.max_sessions;
  const load = h("div", { class: "load" });
  if (max) {
    const meter = h("meter", { min: 0, max, value: view.sessions, low: max * 0.7, high: max * 0.9, optimum: 0, "aria-label": `${view.sessions} of ${max} sessions` });
    load.append(meter, h("span", {}, `${view.sessions} / ${max}`));
  } else {
    load.append(h("span", {}, `${view.sessions}`), h("span", { class: "muted" }, " (no limit)"));
  }
  const button = h(
    "button",
    {
      type: "button",
      class: view.draining ? "button" : "button warn",
      disabled: busy,
      "data-focus-key": `drain-${view.service_id}`,
      "aria-label": `${view.draining ? "Undrain" : "Drain"} ${view.service_id}`,
    },
    busy ? "…" : view.draining ? "Undrain" : "Drain",
  );
  button.addEventListener("click", onToggle);
  return h(
    "tr",
    { dataset: { service: view.service_id, status: view.status, draining: String(view.draining) } },
    h(
      "td",
      { "data-label": "Service" },
      h("div", { class: "mono strong" }, view.service_id),
      h("div", { class: "muted small" }, [type, view.endpoint].filter(Boolean).join(" · ")),
    ),
    h(
      "td",
      { "data-label": "Health" },
      badge(view.status),
      view.last_error ? h("div", { class: "reason small" }, view.last_error) : null,
    ),
    h("td", { "data-label": "Load" }, load),
    h("td", { "data-label": "Draining" }, view.draining ? badge("draining") : h("span", { class: "muted" }, "no")),
    h("td", { "data-label": "Last check" }, view.last_check_at ? timeElement(view.last_check_at, ago(view.last_check_at)) : "not yet"),
    h("td", { "data-label": "Registered" }, timeElement(view.registered_at, ago(view.registered_at))),
    h("td", { "data-label": "Action" }, button),
  );
}
