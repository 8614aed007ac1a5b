// What the console knows of the manager, kept current: sessions and services as the API shows
// them, and the latest events. One event stream feeds it; an event about a session makes the
// console read that session again (its view is the truth, the event only says it changed).
// Without the event stream (a key without the admin scope), it polls instead.

import { api, ApiError, openStream } from "./api.js";

const KEPT_EVENTS = 1000;
const KEPT_ENDED_SESSIONS = 200;
const LIVE_STATUSES = ["Creating", "WaitingForServices", "Ready", "Active", "Terminating"];
const LIVE_PAGE = 500;
const MAX_LIVE_PAGES = 10;
const BACKLOG_PAGES = 20; // pages of 500 events read at start, to find the latest ones
const POLL_MS = 3000;
const SERVICES_POLL_MS = 3000; // load is not an event: services are read again this often
const REFRESH_DELAY_MS = 60; // events about one session that come together cost one read

const SESSION_EVENT = /^(Session|Client|MicroserviceDispatch|MicroserviceJoined|MicroserviceLeft)/;
const SERVICE_EVENT = /^Microservice(Registered|Updated|Deregistered|HealthChanged)$/;

class Live {
  constructor() {
    this.sessions = new Map(); // session_id -> view
    this.services = new Map(); // service_id -> view
    this.events = []; // oldest first, at most KEPT_EVENTS
    this.streamState = "connecting";
    this.streamProblem = null;
    this.loadError = null;
    this._listeners = new Set();
    this._refreshing = new Map();
    this._stop = null;
    this._timers = [];
  }

  subscribe(listener) {
    this._listeners.add(listener);
    return () => this._listeners.delete(listener);
  }

  _changed(what, detail) {
    for (const listener of this._listeners) listener(what, detail);
  }

  async start() {
    this.stop();
    this.loadError = null;
    // Another key may see other sessions: nothing of the last one's is kept.
    this.sessions = new Map();
    this.services = new Map();
    this.events = [];
    await Promise.all([this.loadSessions(), this.loadServices()]);
    const backlog = await this._backlog();
    if (backlog === null) {
      this._setStream("polling", this.streamProblem);
      this._timers.push(setInterval(() => this.loadSessions(), POLL_MS));
    } else {
      this._stop = openStream("/api/v1/events", {
        lastEventId: backlog,
        onEvent: (event) => this._onEvent(event),
        onState: (state, failure) => this._setStream(state, failure ? failure.message : null),
      });
    }
    this._timers.push(setInterval(() => this.loadServices(), SERVICES_POLL_MS));
  }

  stop() {
    if (this._stop) this._stop();
    this._stop = null;
    for (const timer of this._timers) clearInterval(timer);
    this._timers = [];
  }

  _setStream(state, problem) {
    this.streamState = state;
    this.streamProblem = problem;
    this._changed("stream");
  }

  // The latest kept events, read page by page; returns the id to stream from, or null when
  // this key may not read the event stream.
  async _backlog() {
    let since = 0;
    try {
      for (let page = 0; page < BACKLOG_PAGES; page++) {
        const answer = await api.eventPage(`since=${since}&limit=500`);
        this._keep(answer.events);
        since = answer.next;
        if (answer.events.length < 500) break;
      }
    } catch (failure) {
      if (failure instanceof ApiError && failure.status === 403) {
        this.streamProblem = "the event stream needs a key with the admin scope";
        return null;
      }
      this.streamProblem = failure.message;
      return null;
    }
    this._changed("events");
    return since;
  }

  _keep(events) {
    this.events.push(...events);
    if (this.events.length > KEPT_EVENTS) this.events.splice(0, this.events.length - KEPT_EVENTS);
  }

  _onEvent(event) {
    this._keep([event]);
    this._changed("event", event);
    if (event.session_id && SESSION_EVENT.test(event.type)) this.refreshSession(event.session_id);
    if (SERVICE_EVENT.test(event.type) && event.service_id) {
      if (event.type === "MicroserviceDeregistered") this.services.delete(event.service_id);
      else if (event.data && event.data.service_id === event.service_id) {
        this.services.set(event.service_id, { ...this.services.get(event.service_id), ...event.data });
      }
      this._changed("services");
      if (event.type === "MicroserviceHealthChanged") this.loadServices();
    }
    if (event.type === "EventsDropped") this.loadSessions();
  }

  refreshSession(id) {
    if (this._refreshing.has(id)) return;
    this._refreshing.set(
      id,
      setTimeout(async () => {
        this._refreshing.delete(id);
        try {
          this.sessions.set(id, await api.session(id));
        } catch (failure) {
          if (!(failure instanceof ApiError && failure.status === 404)) return;
          this.sessions.delete(id);
        }
        this._trimEnded();
        this._changed("sessions", id);
      }, REFRESH_DELAY_MS),
    );
  }

  // Every live session (page by page, up to MAX_LIVE_PAGES pages of each live status), and the
  // latest ended ones.
  async loadSessions() {
    try {
      const views = [];
      for (const status of LIVE_STATUSES) {
        let cursor = null;
        for (let page = 0; page < MAX_LIVE_PAGES; page++) {
          const more = cursor ? `&cursor=${encodeURIComponent(cursor)}` : "";
          const answer = await api.sessions(`?status=${status}&limit=${LIVE_PAGE}${more}`);
          views.push(...answer.sessions);
          cursor = answer.next_cursor;
          if (!cursor) break;
        }
      }
      const ended = await api.sessions(`?status=Terminated&limit=${KEPT_ENDED_SESSIONS}`);
      views.push(...ended.sessions);
      for (const view of views) this.sessions.set(view.session_id, view);
      this.loadError = null;
      this._changed("sessions");
    } catch (failure) {
      this.loadError = failure;
      this._changed("sessions");
    }
  }

  async loadServices() {
    try {
      const answer = await api.services();
      this.services = new Map(answer.microservices.map((view) => [view.service_id, view]));
      this._changed("services");
    } catch (failure) {
      if (failure instanceof ApiError && failure.status === 401) this.stop();
    }
  }

  _trimEnded() {
    const ended = [...this.sessions.values()].filter((view) => view.status === "Terminated");
    if (ended.length <= KEPT_ENDED_SESSIONS) return;
    ended.sort((a, b) => (a.terminated_at || "").localeCompare(b.terminated_at || ""));
    for (const view of ended.slice(0, ended.length - KEPT_ENDED_SESSIONS)) {
      this.sessions.delete(view.session_id);
    }
  }
}

export const live = new Live();
