// Building the page: elements made with text nodes only (nothing the API returns is ever parsed
// as HTML), and the few formats every view shares.

export function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") element.className = value;
    else if (name === "dataset") Object.assign(element.dataset, value);
    else if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (value === true) element.setAttribute(name, "");
    else element.setAttribute(name, String(value));
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(element, child);
    else element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

// Replace an element's children, keeping keyboard focus on the control that had it: a row
// rebuilt by a live update would otherwise drop the focus of someone tabbing through it.
export function replaceChildren(element, ...children) {
  const active = document.activeElement;
  const key = active && element.contains(active) ? active.dataset.focusKey : undefined;
  element.replaceChildren();
  append(element, children);
  if (key) {
    const again = element.querySelector(`[data-focus-key="${CSS.escape(key)}"]`);
    if (again) again.focus();
  }
}

export function badge(text, kind = text) {
  return h("span", { class: `badge badge-${String(kind).toLowerCase()}` }, text);
}

export function parseTime(text) {
  if (!text) return null;
  const ms = Date.parse(text);
  return Number.isNaN(ms) ? null : ms;
}

// 850 ms, 4.2 s, 3 min 10 s, 2 h 5 min
export function duration(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return "–";
  if (ms < 0) ms = 0;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)} s`;
  const minutes = Math.floor(ms / 60_000);
  if (minutes < 60) return `${minutes} min ${Math.floor((ms % 60_000) / 1000)} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

export function ago(text, now = Date.now()) {
  const at = parseTime(text);
  if (at === null) return "never";
  return `${duration(now - at)} ago`;
}

export function clock(text) {
  const at = parseTime(text);
  if (at === null) return "–";
  const date = new Date(at);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
}

export function dateTime(text) {
  const at = parseTime(text);
  return at === null ? "–" : new Date(at).toLocaleString();
}

export function timeElement(text, shown) {
  return h("time", { datetime: text || undefined, title: dateTime(text) }, shown);
}

export function shortId(id) {
  return id && id.length > 13 ? `${id.slice(0, 8)}…` : id || "–";
}

export function message(kind, ...text) {
  return h("p", { class: `notice notice-${kind}`, role: kind === "error" ? "alert" : "status" }, ...text);
}
