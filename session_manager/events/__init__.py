"""Events: what happened to sessions and microservices, told to whoever listens.

One writer, many readers, nobody waits on anybody:

- `EventLog.append(type, session_id=…, service_id=…, data=…)` is the only way an event is made.
  Session actors (and the registry) call it from their own loop; it is synchronous and cheap,
  assigns the next id, stores the event in a bounded history (a ring of the last `history`
  events, indexed by session) and wakes the readers interested in it.
- Readers are cursors into that history (`EventLog.subscribe` → `Subscription`): an SSE client
  reads at its own pace; a slow or stalled one only falls behind, holding no copy of anything,
  and if the history moves past it, it gets one `EventsDropped` event naming the ids it missed,
  whose id lets a `Last-Event-ID` resume continue after the gap. `EventLog.since` serves clients
  that poll.
- `sse` exposes both over HTTP (`add_event_routes`); it is the only module here that knows the
  aiohttp server.
- `OutboundWebhooks.offer` (an `EventLog` listener) queues each event for every webhook target
  that wants it; workers POST them signed (`signing`: Standard Webhooks), in order per session,
  retrying with back-off, from a bounded queue.
- Several managers on one Redis: `redis_feed.RedisEventFeed` is the log's `EventSink`. Every
  process's events go through one Redis stream and come back to every log (`EventLog.ingest`)
  with the same global ids; each event is offered to the outbound webhooks of one process.
  (Not imported here: only a manager configured for Redis loads its client.)

No credential leaves in an event: `data` keys naming a token, secret, password or authorization
are removed when the event is made.
"""

from session_manager.events.log import (
    DEFAULT_HISTORY,
    EventListener,
    EventLog,
    EventSink,
)
from session_manager.events.model import (
    EVENT_TYPE_NAMES,
    Event,
    EventPage,
    EventType,
    MissedEvents,
    MissedReason,
)
from session_manager.events.outbound import (
    DeliveryStats,
    OutboundWebhooks,
    WebhookPolicy,
    WebhookTarget,
)
from session_manager.events.signing import (
    ATTEMPT_HEADER,
    EVENT_TYPE_HEADER,
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    as_whsec,
    sign_headers,
    verify_signature,
)
from session_manager.events.sse import (
    EVENTS_PATH,
    SESSION_EVENTS_PATH,
    EventRoutes,
    SessionPresence,
    add_event_routes,
    sse_frame,
)
from session_manager.events.subscription import Subscription

__all__ = [
    "ATTEMPT_HEADER",
    "DEFAULT_HISTORY",
    "EVENTS_PATH",
    "EVENT_TYPE_HEADER",
    "EVENT_TYPE_NAMES",
    "ID_HEADER",
    "SESSION_EVENTS_PATH",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "DeliveryStats",
    "Event",
    "EventListener",
    "EventLog",
    "EventPage",
    "EventRoutes",
    "EventSink",
    "EventType",
    "MissedEvents",
    "MissedReason",
    "OutboundWebhooks",
    "SessionPresence",
    "Subscription",
    "WebhookPolicy",
    "WebhookTarget",
    "add_event_routes",
    "as_whsec",
    "sign_headers",
    "sse_frame",
    "verify_signature",
]
