"""A client for trail's submission socket, in pure standard-library Python (3.9+).

trail is an audit-trail daemon: programs submit audit events as JSON lines over a Unix socket, and the daemon
answers each one only after the event is written (and synced) to its log. This module speaks that protocol::

    import trail_client

    with trail_client.Client() as client:
        ack = client.submit(trail_client.event(
            "user_login", actor={"id": "u-42", "ip": "10.0.0.7"}, outcome="success",
            payload={"method": "sso"}))
        print(ack.id, ack.seq)

Every refusal is raised as a subclass of :class:`TrailError`, one per protocol error code (:class:`InvalidPayload`,
:class:`Unavailable`, ...); :attr:`TrailError.retryable` says whether sending the same event again later can
succeed. :meth:`Client.submit` retries retryable refusals and lost connections itself when the client has a
:class:`Retry` policy, reusing one ``idempotency_key`` for every attempt, so that a retry never stores an event
twice. :class:`TrailHandler` sends the records of a :mod:`logging` logger as events.

Before it talks to a socket the client checks that the socket is the daemon's, as the ``trail`` tool does: every
directory on the socket's path is owned by a trusted user and not writable by others (a sticky directory above
the socket's own is allowed), the socket is a socket owned by a trusted user, and the process listening on it runs
as a trusted user (``SO_PEERCRED``). Trusted users are root, the client's own user and the user named by
``$TRAIL_SOCKET_OWNER`` (a name or a uid) or the ``socket_owner`` argument.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import random
import socket
import stat
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Type, Union

__all__ = [
    "Ack",
    "Client",
    "Conflict",
    "Forbidden",
    "InvalidEvent",
    "InvalidJson",
    "InvalidPayload",
    "ProtocolError",
    "RateLimited",
    "Retry",
    "TooLarge",
    "TooManyConnections",
    "TrailError",
    "TrailHandler",
    "Unavailable",
    "UnknownType",
    "Unreachable",
    "UntrustedSocket",
    "Violation",
    "default_socket",
    "event",
]

__version__ = "0.1.0"

SOCKET_VAR = "TRAIL_SOCKET"
SOCKET_OWNER_VAR = "TRAIL_SOCKET_OWNER"

Event = Dict[str, Any]


def default_socket() -> str:
    """The socket used when none is given: ``$TRAIL_SOCKET``, else ``$XDG_RUNTIME_DIR/trail/trail.sock``, else
    ``run/trail.sock`` (the same rule as the ``trail`` tool)."""
    path = os.environ.get(SOCKET_VAR)
    if path:
        return path
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "trail", "trail.sock")
    return os.path.join("run", "trail.sock")


def event(
    type: str,
    *,
    actor: Optional[Mapping[str, Any]] = None,
    target: Optional[Mapping[str, Any]] = None,
    message: Optional[str] = None,
    outcome: Optional[str] = None,
    payload: Optional[Mapping[str, Any]] = None,
    occurred_at: Optional[str] = None,
    idempotency_key: Optional[str] = None,
) -> Event:
    """Builds a request object, leaving out the fields that are ``None``. ``outcome`` is ``"success"``,
    ``"failure"`` or ``"denied"``; ``occurred_at`` an RFC 3339 time (the daemon's receive time when absent)."""
    fields = {
        "type": type,
        "actor": dict(actor) if actor is not None else None,
        "target": dict(target) if target is not None else None,
        "message": message,
        "outcome": outcome,
        "payload": dict(payload) if payload is not None else None,
        "occurred_at": occurred_at,
        "idempotency_key": idempotency_key,
    }
    return {k: v for k, v in fields.items() if v is not None}


@dataclass(frozen=True)
class Ack:
    """The daemon's acknowledgement: the event is stored under ``id`` and ``seq``. ``duplicate`` is true when an
    earlier request with the same ``idempotency_key`` stored it and this one stored nothing."""

    id: str
    seq: int
    duplicate: bool = False


@dataclass(frozen=True)
class Violation:
    """One problem the daemon found in a request: a JSON pointer into it and what is wrong there."""

    path: str
    message: str


class TrailError(Exception):
    """A request the daemon refused, or a daemon that cannot be used. ``code`` is the protocol's error code."""

    code: str = ""
    #: Whether sending the same event again later can succeed.
    retryable: bool = False

    def __init__(self, message: str, details: Sequence[Violation] = (), code: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.details: List[Violation] = list(details)
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.code else self.message


class InvalidJson(TrailError):
    """The line is not acceptable JSON (not UTF-8, a repeated key, nested too deep, a lone surrogate escape)."""

    code = "invalid_json"


class InvalidEvent(TrailError):
    """The envelope violates the event schema (a missing ``type``, an unknown field, a bad ``outcome``, ...)."""

    code = "invalid_event"


class UnknownType(TrailError):
    """No such event type is defined."""

    code = "unknown_type"


class InvalidPayload(TrailError):
    """The payload violates the type's payload schema; ``details`` lists every violation."""

    code = "invalid_payload"


class TooLarge(TrailError):
    """The line is longer than the daemon's ``limits.max_line_bytes``."""

    code = "too_large"


class Unavailable(TrailError):
    """The daemon cannot take the event now (log not writable, no sink selects a stream-only type, ...)."""

    code = "unavailable"
    retryable = True


class Forbidden(TrailError):
    """This client may not submit this event (for example a ``trail_*`` type, which only the daemon records)."""

    code = "forbidden"


class TooManyConnections(TrailError):
    """The daemon has as many connections open as it allows; the connection was closed."""

    code = "too_many_connections"
    retryable = True


class RateLimited(TrailError):
    """This user submitted more events than its rate allows; ``retry_after`` (seconds) says when to try again."""

    code = "rate_limited"
    retryable = True

    def __init__(self, message: str, details: Sequence[Violation] = (), code: Optional[str] = None,
                 retry_after: Optional[float] = None):
        super().__init__(message, details, code)
        self.retry_after = retry_after


class Conflict(TrailError):
    """The ``idempotency_key`` was used before, by this user, for a different event."""

    code = "conflict"


class Unreachable(TrailError):
    """The daemon cannot be reached: no socket, connection refused, or the connection broke before the answer."""

    code = ""
    retryable = True


class UntrustedSocket(TrailError):
    """The socket, a directory above it, or the process listening on it is not a trusted user's: it may be an
    impostor's, so nothing was sent."""


class ProtocolError(TrailError):
    """The daemon answered something this client does not understand."""


_ERRORS: Dict[str, Type[TrailError]] = {
    cls.code: cls
    for cls in (InvalidJson, InvalidEvent, UnknownType, InvalidPayload, TooLarge, Unavailable, Forbidden,
                TooManyConnections, RateLimited, Conflict)
}


def _error_from_answer(answer: Mapping[str, Any]) -> TrailError:
    error = answer.get("error")
    if not isinstance(error, dict) or not isinstance(error.get("code"), str):
        return ProtocolError(f"unexpected answer: {json.dumps(answer)}")
    code = error["code"]
    message = str(error.get("message", ""))
    details = [
        Violation(str(d.get("path", "")), str(d.get("message", "")))
        for d in error.get("details") or []
        if isinstance(d, dict)
    ]
    cls = _ERRORS.get(code)
    if cls is RateLimited:
        after = error.get("retry_after_ms")
        return RateLimited(message, details, retry_after=after / 1000 if isinstance(after, (int, float)) else None)
    if cls is None:
        # A code added to the protocol after this client was written: still a refusal, with its code.
        return TrailError(message, details, code=code)
    return cls(message, details)


def _answer(line: bytes) -> Union[Ack, TrailError]:
    try:
        answer = json.loads(line)
    except ValueError:
        return ProtocolError(f"the daemon's answer is not JSON: {line[:200]!r}")
    if not isinstance(answer, dict):
        return ProtocolError(f"unexpected answer: {line[:200]!r}")
    if answer.get("ok") is True:
        try:
            return Ack(str(answer["id"]), int(answer["seq"]), bool(answer.get("duplicate", False)))
        except (KeyError, TypeError, ValueError):
            return ProtocolError(f"unexpected answer: {line[:200]!r}")
    return _error_from_answer(answer)


def _trusted_uids(socket_owner: Optional[Union[str, int]]) -> List[int]:
    uids = [0, os.geteuid()]
    who = socket_owner if socket_owner is not None else os.environ.get(SOCKET_OWNER_VAR, "").strip()
    origin = "socket_owner" if socket_owner is not None else SOCKET_OWNER_VAR
    if isinstance(who, int):
        uids.append(who)
    elif who:
        if who.isdigit():
            uids.append(int(who))
        else:
            try:
                uids.append(pwd.getpwnam(who).pw_uid)
            except KeyError:
                raise UntrustedSocket(f"{origin}: there is no user {who!r}; give a user name or a uid") from None
    return uids


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _check_socket(path: str, uids: List[int]) -> str:
    """Checks the socket's directories and the socket (see the module docs); returns the path to connect to."""
    directory, name = os.path.split(path)
    if not name:
        raise UntrustedSocket(f"{path}: not a socket")
    canonical = os.path.realpath(directory or ".")
    try:
        os.stat(canonical)
    except OSError as e:
        raise Unreachable(f"cannot reach the daemon's socket {path}: {e.strerror}") from None
    trusted = ", ".join(_user(u) for u in dict.fromkeys(uids))
    d = canonical
    first = True
    while True:
        meta = os.lstat(d)
        if meta.st_uid not in uids:
            raise UntrustedSocket(
                f"{path}: directory {d} belongs to {_user(meta.st_uid)}, not to a trusted user ({trusted}); "
                f"if the socket is that of a daemon that runs as that user, say so with {SOCKET_OWNER_VAR}")
        mode = stat.S_IMODE(meta.st_mode)
        if mode & 0o022 and (first or not mode & stat.S_ISVTX):
            raise UntrustedSocket(
                f"{path}: directory {d} (mode {mode:o}) can be written by other users, who could replace the socket")
        first = False
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    socket_path = os.path.join(canonical, name)
    try:
        meta = os.lstat(socket_path)
    except OSError as e:
        raise Unreachable(f"cannot reach the daemon's socket {path}: {e.strerror}") from None
    if stat.S_ISLNK(meta.st_mode):
        raise UntrustedSocket(f"{path}: is a symbolic link; give the socket's own path")
    if not stat.S_ISSOCK(meta.st_mode):
        raise UntrustedSocket(f"{path}: not a socket")
    if meta.st_uid not in uids:
        raise UntrustedSocket(
            f"{path}: the socket belongs to {_user(meta.st_uid)}, not to a trusted user ({trusted}); if it is that "
            f"of a daemon that runs as that user, say so with {SOCKET_OWNER_VAR}")
    return socket_path


@dataclass
class Retry:
    """When and how :class:`Client` retries: refusals that are :attr:`TrailError.retryable` and connections
    that broke before the answer, with exponential backoff (doubling from ``initial`` up to ``maximum`` seconds,
    with jitter; a ``rate_limited`` answer's own delay when it is longer) for at most ``deadline`` seconds in all.
    Every attempt carries the same ``idempotency_key`` (one is generated when the event has none), so the daemon
    stores the event once whatever happened to earlier answers."""

    deadline: float = 30.0
    initial: float = 0.05
    maximum: float = 2.0

    def delays(self) -> Iterable[float]:
        delay = self.initial
        while True:
            yield delay * random.uniform(0.5, 1.0)
            delay = min(delay * 2, self.maximum)


class Client:
    """One connection to the daemon's submission socket (opened on first use, reopened after it broke).

    ``socket`` defaults to :func:`default_socket`; ``socket_owner`` adds a trusted owner (see the module docs);
    ``timeout`` bounds each wait for the daemon, in seconds (``None``: wait as long as it takes; a durable write
    can take a while on a busy disk); ``retry`` enables automatic retries (:class:`Retry`).
    """

    def __init__(self, socket: Optional[str] = None, *, socket_owner: Optional[Union[str, int]] = None,
                 timeout: Optional[float] = 30.0, retry: Optional[Retry] = None):
        self.socket_path = socket if socket is not None else default_socket()
        self.timeout = timeout
        self.retry = retry
        self._uids = _trusted_uids(socket_owner)
        self._sock: Optional[socket.socket] = None
        self._buffer = b""

    def __enter__(self) -> "Client":
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Opens the connection now (otherwise the first request does), after checking the socket."""
        if self._sock is not None:
            return
        path = _check_socket(self.socket_path, self._uids)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise Unreachable(f"cannot reach the daemon at {self.socket_path}: {e.strerror or e}") from None
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in self._uids:
            sock.close()
            raise UntrustedSocket(
                f"{self.socket_path}: the process listening on it runs as {_user(uid)}, not as a trusted user")
        self._sock = sock
        self._buffer = b""

    def close(self) -> None:
        """Closes the connection; the client can be used again (it reconnects)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buffer = b""

    def submit(self, event: Mapping[str, Any]) -> Ack:
        """Submits one event and returns its acknowledgement, or raises the :class:`TrailError` the daemon
        answered. With a :class:`Retry` policy, retryable refusals and broken connections are retried with the
        same ``idempotency_key`` until the deadline."""
        result = self.submit_many([event])[0]
        if isinstance(result, TrailError):
            raise result
        return result

    def submit_many(self, events: Iterable[Mapping[str, Any]]) -> List[Union[Ack, TrailError]]:
        """Submits events pipelined over one connection (all are sent before the answers are read) and returns
        one result per event, in order: its :class:`Ack` or the :class:`TrailError` it was refused with. A refused
        event does not affect the others. With a :class:`Retry` policy, the events whose result is retryable are
        sent again (with their idempotency keys) until none is or the deadline passes."""
        batch = [dict(e) for e in events]
        if self.retry is None:
            return self._attempt(batch)
        for e in batch:
            e.setdefault("idempotency_key", str(uuid.uuid4()))
        results: List[Union[Ack, TrailError, None]] = [None] * len(batch)
        pending = list(range(len(batch)))
        deadline = time.monotonic() + self.retry.deadline
        delays = iter(self.retry.delays())
        while True:
            got = self._attempt([batch[i] for i in pending])
            for i, r in zip(pending, got):
                results[i] = r
            pending = [i for i in pending if isinstance(results[i], TrailError) and results[i].retryable]
            if not pending:
                break
            delay = next(delays)
            waits = [r.retry_after for i in pending if isinstance(r := results[i], RateLimited) and r.retry_after]
            delay = max([delay] + waits)
            if time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
        return [r for r in results if r is not None]

    def _attempt(self, batch: Sequence[Mapping[str, Any]]) -> List[Union[Ack, TrailError]]:
        """Sends `batch` once. Events whose answer did not arrive (the connection broke) get :class:`Unreachable`."""
        lines = []
        for e in batch:
            lines.append(json.dumps(e, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
        try:
            self.connect()
        except Unreachable as e:
            return [e for _ in batch]
        results: List[Union[Ack, TrailError]] = []
        sock = self._sock
        assert sock is not None
        try:
            sock.sendall(b"".join(lines))
        except OSError as e:
            # The daemon may have answered and closed (too_many_connections); read what it said.
            broken: Optional[TrailError] = Unreachable(f"the connection to the daemon broke: {e.strerror or e}")
        else:
            broken = None
        while len(results) < len(batch):
            line = self._read_line()
            if line is None:
                break
            answer = _answer(line)
            results.append(answer)
            if isinstance(answer, TooManyConnections):
                break
        if len(results) < len(batch):
            self.close()
            lost = broken or Unreachable("the daemon closed the connection before answering")
            if results and isinstance(results[-1], TooManyConnections):
                lost = results[-1]
            results.extend(lost for _ in range(len(batch) - len(results)))
        return results

    def _read_line(self) -> Optional[bytes]:
        sock = self._sock
        assert sock is not None
        while b"\n" not in self._buffer:
            try:
                chunk = sock.recv(65536)
            except OSError:
                return None
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line


class TrailHandler(logging.Handler):
    """A :mod:`logging` handler that submits each record it handles as an event of type ``event_type``.

    The event's ``message`` is the record's formatted message; ``payload`` is what ``payload(record)`` returns
    (default: ``{"logger": name, "level": levelname}``), and it must satisfy the type's payload schema;
    ``actor(record)`` may return the actor object. A refused event goes to :meth:`handleError` (logging's usual
    path for a handler that fails), so the program goes on.
    """

    def __init__(self, event_type: str, *, client: Optional[Client] = None,
                 payload: Optional[Callable[[logging.LogRecord], Mapping[str, Any]]] = None,
                 actor: Optional[Callable[[logging.LogRecord], Optional[Mapping[str, Any]]]] = None,
                 level: int = logging.NOTSET):
        super().__init__(level)
        self.event_type = event_type
        self.client = client if client is not None else Client()
        self.payload = payload or (lambda r: {"logger": r.name, "level": r.levelname})
        self.actor = actor or (lambda r: None)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.client.submit(event(
                self.event_type,
                message=self.format(record),
                payload=self.payload(record),
                actor=self.actor(record),
            ))
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.client.close()
        super().close()
