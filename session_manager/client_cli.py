"""The operator's subcommands of `session-manager`, on the API client: `sessions`, `services`,
`events tail` and `create-session`. Each talks to a running manager (`--url`, else
`$SESSION_MANAGER_URL`, else http://127.0.0.1:8080) with the key in `$SESSION_MANAGER_API_KEY`,
and prints a table, or JSON with `--json`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pydantic import BaseModel

from session_manager.client import (
    API_KEY_ENV,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    URL_ENV,
    ApiError,
    Event,
    Service,
    Session,
    SessionManagerClient,
)

COMMANDS = ("sessions", "services", "events", "create-session")

Handler = Callable[[SessionManagerClient, argparse.Namespace], Awaitable[None]]


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get(URL_ENV) or DEFAULT_URL,
        help=f"the manager's API [env {URL_ENV}; default {DEFAULT_URL}]; "
        f"the API key comes from ${API_KEY_ENV}",
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    common.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per call [%(default)s]"
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="session-manager", description="Manage a running Session Manager."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    sessions = commands.add_parser("sessions", help="list, show or delete sessions")
    sessions_do = sessions.add_subparsers(dest="action", required=True)
    listing = sessions_do.add_parser("list", parents=[common], help="sessions, newest first")
    listing.add_argument("--status", help="only sessions in this status")
    listing.add_argument("--user", help="only this user_identity's sessions")
    listing.add_argument("--limit", type=int, help="at most this many (default: all)")
    listing.set_defaults(handler=_sessions_list)
    for action, handler, text in (
        ("show", _sessions_show, "one session"),
        ("delete", _sessions_delete, "end a session"),
    ):
        sub = sessions_do.add_parser(action, parents=[common], help=text)
        sub.add_argument("session_id")
        sub.set_defaults(handler=handler)

    services = commands.add_parser("services", help="list, show, drain or deregister services")
    services_do = services.add_subparsers(dest="action", required=True)
    listing = services_do.add_parser("list", parents=[common], help="registered microservices")
    listing.add_argument("--type", help="only this metadata type")
    listing.add_argument("--status", help="only this health status")
    listing.set_defaults(handler=_services_list)
    for action, handler, text in (
        ("show", _services_show, "one registration"),
        ("drain", _services_drain, "send the instance no new sessions"),
        ("delete", _services_delete, "deregister the instance"),
    ):
        sub = services_do.add_parser(action, parents=[common], help=text)
        sub.add_argument("service_id")
        sub.set_defaults(handler=handler)

    events = commands.add_parser("events", help="follow the event stream")
    events_do = events.add_subparsers(dest="action", required=True)
    tail = events_do.add_parser(
        "tail", parents=[common], help="print events as they happen (reconnects, no gaps)"
    )
    tail.add_argument("--session", help="only this session's events")
    tail.add_argument("--type", action="append", default=[], help="only this type (repeatable)")
    tail.add_argument("--since", type=int, help="start after this event id (else: from now)")
    tail.add_argument("--count", type=int, help="stop after this many events")
    tail.set_defaults(handler=_events_tail)

    create = commands.add_parser("create-session", parents=[common], help="create a session")
    create.add_argument("--user", required=True, help="the user_identity")
    create.add_argument(
        "--service",
        action="append",
        default=[],
        help='a required service: an id, "type:X" or "agent:NAME" (repeatable; none: a room '
        "with no services)",
    )
    create.add_argument("--name", help="the user_name")
    create.add_argument("--room", help="the room name (default: generated)")
    create.add_argument("--metadata", type=json.loads, help="a JSON object")
    create.add_argument("--wait", action="store_true", help="answer once the services joined")
    create.set_defaults(handler=_create_session)
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler

    async def run() -> None:
        api_key = os.environ.get(API_KEY_ENV) or None
        async with SessionManagerClient(args.url, api_key=api_key, timeout=args.timeout) as client:
            await handler(client, args)

    try:
        asyncio.run(run())
    except ApiError as error:
        print(f"session-manager: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


# ------------------------------------------------------------------------------------- output


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _fields(pairs: Sequence[tuple[str, object]]) -> None:
    width = max(len(name) for name, _ in pairs)
    for name, value in pairs:
        print(f"{name.ljust(width)}  {_cell(value)}")


def _session_rows(sessions: Sequence[Session]) -> None:
    _table(
        ("SESSION", "STATUS", "USER", "SERVICES", "CREATED"),
        [
            (
                s.session_id,
                s.status,
                s.user_identity,
                ",".join(slot.service_id for slot in s.services),
                s.created_at,
            )
            for s in sessions
        ],
    )


def _session_detail(session: Session) -> None:
    _fields(
        [
            ("session_id", session.session_id),
            ("room_name", session.room_name),
            ("status", session.status),
            ("reason", session.reason),
            ("user", session.user_identity),
            ("client_joined", session.client.joined),
            ("created_at", session.created_at),
            ("ready_at", session.ready_at),
            ("terminated_at", session.terminated_at),
            ("owner", session.owner),
        ]
    )
    if session.services:
        print()
        _table(
            ("SERVICE", "REQUIREMENT", "STATE", "ENDPOINT", "JOIN_MS", "ERROR"),
            [
                (s.service_id, s.requirement, s.state, s.endpoint, s.join_ms, s.error)
                for s in session.services
            ],
        )


def _service_rows(services: Sequence[Service]) -> None:
    _table(
        ("SERVICE", "STATUS", "DRAINING", "SESSIONS", "TYPE", "ENDPOINT"),
        [
            (
                s.service_id,
                s.status,
                s.draining,
                s.sessions if s.max_sessions is None else f"{s.sessions}/{s.max_sessions}",
                s.metadata.get("type"),
                s.endpoint,
            )
            for s in services
        ],
    )


def _service_detail(service: Service) -> None:
    _fields(
        [
            ("service_id", service.service_id),
            ("endpoint", service.endpoint),
            ("status", service.status),
            ("draining", service.draining),
            ("sessions", service.sessions),
            ("max_sessions", service.max_sessions),
            ("last_error", service.last_error),
            ("last_check_at", service.last_check_at),
            ("registered_at", service.registered_at),
            ("metadata", json.dumps(service.metadata, ensure_ascii=False)),
        ]
    )


def _event_line(event: Event) -> str:
    data = json.dumps(event.data, ensure_ascii=False, separators=(",", ":"))
    return "  ".join(
        _cell(v)
        for v in (event.id, event.timestamp, event.type, event.session_id, event.service_id, data)
    )


# ----------------------------------------------------------------------------------- handlers


async def _sessions_list(client: SessionManagerClient, args: argparse.Namespace) -> None:
    sessions: list[Session] = []
    async for session in client.iter_sessions(status=args.status, user_identity=args.user):
        sessions.append(session)
        if args.limit is not None and len(sessions) >= args.limit:
            break
    if args.json:
        _print_json([_dump(s) for s in sessions])
    else:
        _session_rows(sessions)


async def _sessions_show(client: SessionManagerClient, args: argparse.Namespace) -> None:
    session = await client.get_session(args.session_id)
    _print_json(_dump(session)) if args.json else _session_detail(session)


async def _sessions_delete(client: SessionManagerClient, args: argparse.Namespace) -> None:
    session = await client.delete_session(args.session_id)
    _print_json(_dump(session)) if args.json else _session_detail(session)


async def _services_list(client: SessionManagerClient, args: argparse.Namespace) -> None:
    services = await client.list_services(type=args.type, status=args.status)
    _print_json([_dump(s) for s in services]) if args.json else _service_rows(services)


async def _services_show(client: SessionManagerClient, args: argparse.Namespace) -> None:
    service = await client.get_service(args.service_id)
    _print_json(_dump(service)) if args.json else _service_detail(service)


async def _services_drain(client: SessionManagerClient, args: argparse.Namespace) -> None:
    service = await client.drain_service(args.service_id)
    _print_json(_dump(service)) if args.json else _service_detail(service)


async def _services_delete(client: SessionManagerClient, args: argparse.Namespace) -> None:
    answer = await client.deregister_service(args.service_id)
    _print_json(_dump(answer)) if args.json else print(f"{answer.service_id}: {answer.message}")


async def _events_tail(client: SessionManagerClient, args: argparse.Namespace) -> None:
    seen = 0
    if not args.json:
        print("  ".join(("ID", "TIMESTAMP", "TYPE", "SESSION", "SERVICE", "DATA")), flush=True)
    async for event in client.events(
        session_id=args.session, types=args.type, last_event_id=args.since
    ):
        line = json.dumps(_dump(event), ensure_ascii=False) if args.json else _event_line(event)
        print(line, flush=True)
        seen += 1
        if args.count is not None and seen >= args.count:
            return


async def _create_session(client: SessionManagerClient, args: argparse.Namespace) -> None:
    if args.metadata is not None and not isinstance(args.metadata, dict):
        raise ApiError(0, "InvalidArguments", "--metadata must be a JSON object")
    created = await client.create_session(
        args.user,
        args.service,
        user_name=args.name,
        room_name=args.room,
        metadata=args.metadata,
        wait_until_ready=args.wait,
    )
    if args.json:
        _print_json(_dump(created))
        return
    _fields(
        [
            ("session_id", created.session_id),
            ("room_name", created.room_name),
            ("status", created.status),
            ("livekit_url", created.livekit_url),
            ("access_token", created.access_token),
        ]
    )
