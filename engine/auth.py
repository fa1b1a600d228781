"""Who may call what: credentials, roles and the gRPC interceptor that enforces them.

A caller proves who it is with a bearer token in the gRPC metadata
(``authorization: Bearer <token>``). The engine knows each token only by its SHA-256,
from a credentials file in TOML::

    [[credential]]
    name = "police-hq"          # unique; appears in logs and the audit trail
    role = "issuer"
    token_sha256 = "9f86d0..."  # hex SHA-256 of the token, never the token itself
    alerts_per_minute = 10      # issuers only (default 10): new alerts in any 60 s

    [[credential]]
    name = "maps-reporter"
    role = "reporter"
    gateway = 1                 # reporters and gateways only: the one gateway they act for
    token_sha256 = "..."

Roles:

- ``issuer``: every AlertService method.
- ``operator``: the read-only ones (GetAlert, ListAlerts, WatchAlert, PreviewAlert) and
  the metrics endpoint.
- ``reporter``: LocationService (ReportLocations, ForgetDevices) for the devices of its
  gateway only; the handlers enforce the gateway with :func:`check_gateway`.
- ``gateway``: GatewayService.Subscribe for its own queue only (:func:`check_gateway`).

Health and reflection are open to everyone. Any other method is refused to everyone
until :data:`METHOD_ROLES` names the roles that may call it: a door nobody listed stays
locked.

:class:`AuthInterceptor` is the gRPC side; :func:`current_caller` tells a handler who
is calling, and :func:`new_alert_quota` counts the alerts it creates against the issuer's
``alerts_per_minute``. ``tuanyuan credentials new`` makes a token and its file entry
(:mod:`engine.security_cli`).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import hashlib
import hmac
import inspect
import json
import logging
import math
import os
import re
import secrets
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

_LOG = logging.getLogger("engine.auth")

ISSUER = "issuer"
OPERATOR = "operator"
REPORTER = "reporter"
GATEWAY = "gateway"
ROLES = (ISSUER, OPERATOR, REPORTER, GATEWAY)
#: Roles bound to one gateway id.
GATEWAY_ROLES = frozenset({REPORTER, GATEWAY})
#: The role of the caller when an interceptor runs with ``insecure_allow_all=True``.
INSECURE_ROLE = "insecure-allow-all"

MAX_GATEWAY = 65535
#: New alerts an issuer may create in any 60 seconds unless its entry says otherwise.
DEFAULT_ALERTS_PER_MINUTE = 10
MAX_ALERTS_PER_MINUTE = 10_000
#: Bytes of randomness in a token: 256 bits.
TOKEN_BYTES = 32

_ALERT = "/tuanyuan.v1.AlertService/"
_LOCATION = "/tuanyuan.v1.LocationService/"
_GATEWAY = "/tuanyuan.v1.GatewayService/"

#: The roles that may call each method of the engine. A method missing here is refused
#: to every credential (PERMISSION_DENIED), unless its service is in OPEN_SERVICES.
METHOD_ROLES: dict[str, frozenset[str]] = {
    _ALERT + "CreateAlert": frozenset({ISSUER}),
    _ALERT + "UpdateAlert": frozenset({ISSUER}),
    _ALERT + "ResolveAlert": frozenset({ISSUER}),
    _ALERT + "GetAlert": frozenset({ISSUER, OPERATOR}),
    _ALERT + "ListAlerts": frozenset({ISSUER, OPERATOR}),
    _ALERT + "WatchAlert": frozenset({ISSUER, OPERATOR}),
    _ALERT + "PreviewAlert": frozenset({ISSUER, OPERATOR}),
    _LOCATION + "ReportLocations": frozenset({REPORTER}),
    _LOCATION + "ForgetDevices": frozenset({REPORTER}),
    _GATEWAY + "Subscribe": frozenset({GATEWAY}),
}
#: Services anyone may call without a token: load balancers probe health, and
#: reflection only describes the public contract.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
#: Methods whose handlers count the alerts they create against an issuer's
#: ``alerts_per_minute`` (:func:`new_alert_quota`).
RATE_LIMITED = frozenset({_ALERT + "CreateAlert"})
#: Roles that may read the metrics endpoint.
METRICS_ROLES = frozenset({OPERATOR, ISSUER})

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIELDS = ("name", "role", "gateway", "token_sha256", "alerts_per_minute")


class CredentialsError(ValueError):
    """A credentials file that cannot be used; the message names the credential and the
    field."""


class Forbidden(Exception):
    """A caller acting outside its credential (PERMISSION_DENIED). ``status`` names the
    gRPC status code, as ``engine.alerts.AlertError.status`` does."""

    status = "PERMISSION_DENIED"


class RateLimited(Forbidden):
    """An issuer that created its ``alerts_per_minute`` already (RESOURCE_EXHAUSTED)."""

    status = "RESOURCE_EXHAUSTED"


# Tokens and their hashes.


def new_token() -> str:
    """A fresh token: 256 random bits, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_sha256(token: str) -> str:
    """The hex SHA-256 of a token, as the credentials file stores it.

    A plain, unsalted hash is enough because tokens are 256 random bits, not passwords:
    nobody can guess one from its hash by trying likely values, so salting and slow
    hashes (bcrypt, scrypt), which exist to slow such guessing down, would add nothing.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# Credentials.


@dataclass(frozen=True)
class Credential:
    """One entry of the credentials file."""

    name: str
    role: str
    #: The gateway a reporter or gateway credential acts for; None for other roles.
    gateway: int | None
    #: Hex SHA-256 of the token (lowercase).
    token_sha256: str
    #: New alerts allowed in any 60 seconds; issuers only, None for other roles.
    alerts_per_minute: int | None = None

    def __repr__(self) -> str:  # keep hashes out of logs and tracebacks
        gateway = f", gateway={self.gateway}" if self.gateway is not None else ""
        return f"Credential(name={self.name!r}, role={self.role!r}{gateway})"

    def describe(self) -> str:
        """``'maps-reporter' (reporter of gateway 1)``, for messages."""
        bound = f" of gateway {self.gateway}" if self.gateway is not None else ""
        return f"'{self.name}' ({self.role}{bound})"


def _check_entry(entry: object, number: int | None) -> Credential:
    """One ``[[credential]]`` table, checked; ``number`` counts from 1 (None: a new one)."""
    where = "new credential" if number is None else f"credential {number}"
    if not isinstance(entry, dict):
        raise CredentialsError(f"{where}: must be a [[credential]] table")
    raw_name = entry.get("name")
    if isinstance(raw_name, str):
        where += f" ({raw_name!r})"

    def fail(field: str, problem: str) -> CredentialsError:
        return CredentialsError(f"{where}: {field} {problem}")

    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise fail(unknown[0], f"is not a known field; known: {', '.join(_FIELDS)}")
    if not isinstance(raw_name, str) or not _NAME.fullmatch(raw_name):
        raise fail("name", f"must be 1 to 64 letters, digits, '.', '_' or '-', got {raw_name!r}")
    role = entry.get("role")
    if role not in ROLES:
        raise fail("role", f"must be one of {', '.join(ROLES)}, got {role!r}")

    gateway = entry.get("gateway")
    if role in GATEWAY_ROLES:
        if gateway is None:
            raise fail("gateway", f"is required for the {role} role (0 to {MAX_GATEWAY})")
        if type(gateway) is not int or not 0 <= gateway <= MAX_GATEWAY:
            raise fail("gateway", f"must be an integer 0 to {MAX_GATEWAY}, got {gateway!r}")
    elif gateway is not None:
        raise fail("gateway", f"is only for the reporter and gateway roles, not {role}")

    digest = entry.get("token_sha256")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest.lower()):
        raise fail(
            "token_sha256",
            "must be 64 hex digits, the SHA-256 of the token (tuanyuan credentials new prints it)",
        )

    limit = entry.get("alerts_per_minute")
    if role == ISSUER:
        if limit is None:
            limit = DEFAULT_ALERTS_PER_MINUTE
        if type(limit) is not int or not 1 <= limit <= MAX_ALERTS_PER_MINUTE:
            raise fail(
                "alerts_per_minute",
                f"must be an integer 1 to {MAX_ALERTS_PER_MINUTE}, got {limit!r}",
            )
    elif limit is not None:
        raise fail("alerts_per_minute", f"is only for the issuer role, not {role}")

    return Credential(raw_name, role, gateway, digest.lower(), limit)


class Credentials:
    """The credentials an engine accepts. Names and token hashes are unique."""

    def __init__(self, entries: Iterable[Credential]) -> None:
        self._entries = tuple(entries)
        names: set[str] = set()
        digests: dict[str, str] = {}
        for number, entry in enumerate(self._entries, 1):
            if entry.name in names:
                raise CredentialsError(
                    f"credential {number} ({entry.name!r}): name is used by an earlier credential"
                )
            names.add(entry.name)
            if entry.token_sha256 in digests:
                raise CredentialsError(
                    f"credential {number} ({entry.name!r}): token_sha256 is the same as that of "
                    f"{digests[entry.token_sha256]!r}; every credential needs its own token"
                )
            digests[entry.token_sha256] = entry.name
        self._digests = [bytes.fromhex(e.token_sha256) for e in self._entries]

    @classmethod
    def parse(cls, text: str, source: str = "credentials") -> Credentials:
        """Credentials from TOML text; errors start with ``source``."""
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise CredentialsError(f"{source}: not valid TOML: {error}") from None
        try:
            extra = sorted(set(document) - {"credential"})
            if extra:
                raise CredentialsError(
                    f"{extra[0]} is not a known table; write each credential as [[credential]]"
                )
            tables = document.get("credential")
            if not isinstance(tables, list) or not tables:
                raise CredentialsError("no credentials: add [[credential]] tables")
            return cls(_check_entry(entry, number) for number, entry in enumerate(tables, 1))
        except CredentialsError as error:
            raise CredentialsError(f"{source}: {error}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> Credentials:
        """Credentials from a TOML file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise CredentialsError(f"{path}: cannot read: {error.strerror or error}") from None
        except UnicodeDecodeError:
            raise CredentialsError(f"{path}: not UTF-8 text") from None
        return cls.parse(text, str(path))

    def find(self, token: str) -> Credential | None:
        """The credential of ``token``, or None.

        Compares the token's hash with every credential's in constant time and never
        stops early, so the time taken tells nothing about which hash came close.
        """
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        for entry, known in zip(self._entries, self._digests, strict=True):
            if hmac.compare_digest(digest, known):
                found = entry
        return found

    def __iter__(self) -> Iterator[Credential]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Credentials({len(self._entries)} entries)"


def to_toml(credential: Credential) -> str:
    """The ``[[credential]]`` table of a credential."""
    lines = ["[[credential]]", f"name = {json.dumps(credential.name)}"]
    lines.append(f"role = {json.dumps(credential.role)}")
    if credential.gateway is not None:
        lines.append(f"gateway = {credential.gateway}")
    lines.append(f'token_sha256 = "{credential.token_sha256}"')
    if credential.alerts_per_minute is not None:
        lines.append(f"alerts_per_minute = {credential.alerts_per_minute}")
    return "\n".join(lines) + "\n"


def new_credential(
    name: str, role: str, gateway: int | None = None, alerts_per_minute: int | None = None
) -> tuple[Credential, str]:
    """A checked credential with a fresh token; returns it and the token."""
    token = new_token()
    entry: dict[str, object] = {"name": name, "role": role, "token_sha256": token_sha256(token)}
    if gateway is not None:
        entry["gateway"] = gateway
    if alerts_per_minute is not None:
        entry["alerts_per_minute"] = alerts_per_minute
    return _check_entry(entry, None), token


# Development credentials.


def dev_credentials(
    gateways: Iterable[int] = (1, 2, 3),
) -> tuple[Credentials, dict[str, str]]:
    """Fresh credentials for a local engine and their tokens by name.

    ``dev-issuer``, ``dev-operator``, and per gateway G ``dev-reporter-G`` and
    ``dev-gateway-G``. The tokens are new on every call; :func:`write_dev_tokens` hands
    them to local clients.
    """
    made = [new_credential("dev-issuer", ISSUER), new_credential("dev-operator", OPERATOR)]
    for gateway in gateways:
        made.append(new_credential(f"dev-reporter-{gateway}", REPORTER, gateway))
        made.append(new_credential(f"dev-gateway-{gateway}", GATEWAY, gateway))
    return Credentials(c for c, _ in made), {c.name: token for c, token in made}


def write_dev_tokens(path: str | os.PathLike, tokens: dict[str, str]) -> None:
    """Writes ``{name: token}`` as JSON, readable by the owner only (mode 0600).

    Writes a temporary file created with mode 0600 and renames it over ``path``, so the
    tokens are never readable by others, not even for a moment, and a reader never sees
    half a file.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(descriptor, 0o600)  # O_CREAT's mode only applies to a new file
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(tokens, file, indent=2, sort_keys=True)
            file.write("\n")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_dev_tokens(path: str | os.PathLike) -> dict[str, str]:
    """The ``{name: token}`` written by :func:`write_dev_tokens`."""
    tokens = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(tokens, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tokens.items()
    ):
        raise ValueError(f"{path}: not a JSON object of credential names to tokens")
    return tokens


# Callers.


@dataclass(frozen=True)
class Caller:
    """Who is making the current call."""

    #: The credential's name (the audit trail's actor).
    name: str
    role: str
    #: The gateway of a reporter or gateway credential; None otherwise.
    gateway: int | None
    #: The caller's address as gRPC gives it, e.g. ``ipv4:127.0.0.1:50312``.
    peer: str


_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("tuanyuan_caller")


def current_caller() -> Caller:
    """The caller of the call being handled.

    gRPC runs each call in its own contextvars context, so this works anywhere on the
    event loop within the call, including tasks it creates. Thread pools do not carry
    contexts over: read the caller before ``run_in_executor`` and pass it along.
    Raises RuntimeError outside a call admitted by :class:`AuthInterceptor`.
    """
    try:
        return _CALLER.get()
    except LookupError:
        raise RuntimeError(
            "no authenticated caller: the call did not pass through AuthInterceptor"
        ) from None


def check_gateway(caller: Caller, gateway_id: int, what: str) -> None:
    """Raises :class:`Forbidden` unless ``caller`` acts for ``gateway_id``.

    ``what`` completes "may only ... of gateway N", e.g. ``"report devices"``, giving
    "credential maps-reporter may only report devices of gateway 1, got gateway 2".
    """
    if caller.role == INSECURE_ROLE:
        return
    if caller.role not in GATEWAY_ROLES or caller.gateway is None:
        raise Forbidden(
            f"credential {caller.name} ({caller.role}) is not bound to a gateway, so it may "
            f"not {what} of gateway {gateway_id}"
        )
    if gateway_id != caller.gateway:
        raise Forbidden(
            f"credential {caller.name} may only {what} of gateway {caller.gateway}, "
            f"got gateway {gateway_id}"
        )


# Rate limits.


class RateLimits:
    """Sliding-window limits on the alerts each credential creates.

    An issuer may create an alert when fewer than its ``alerts_per_minute`` were counted
    in the last ``window_s`` seconds. :meth:`take` counts one before it is created and
    :meth:`give_back` uncounts it when nothing was created after all. Times come from
    ``clock`` (monotonic seconds by default; the engine's clock may be simulated and
    must not stretch real limits). Memory is bounded: at most the limit's worth of times
    per issuer. Not thread-safe: the engine uses it on its event loop only.
    """

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._clock = clock
        self._counted: dict[str, collections.deque[float]] = {}

    def _window(self, credential: Credential) -> tuple[collections.deque[float], float]:
        now = self._clock()
        counted = self._counted.setdefault(credential.name, collections.deque())
        while counted and counted[0] <= now - self.window_s:
            counted.popleft()
        return counted, now

    def take(self, credential: Credential) -> tuple[float | None, float]:
        """Counts one alert of ``credential`` if its limit allows one now: returns the time
        it was counted at (for :meth:`give_back`) and 0.0; otherwise None and the seconds
        until one would be allowed. A credential without a limit is never counted."""
        limit = credential.alerts_per_minute
        if limit is None:
            return None, 0.0
        counted, now = self._window(credential)
        if len(counted) >= limit:
            return None, max(counted[0] + self.window_s - now, 0.001)
        counted.append(now)
        return now, 0.0

    def give_back(self, credential: Credential, counted_at: float) -> None:
        """Uncounts the alert :meth:`take` counted at ``counted_at``."""
        counted = self._counted.get(credential.name)
        if counted is not None and counted_at in counted:
            counted.remove(counted_at)


class _Quota:
    """The rate limit of one call to a method in :data:`RATE_LIMITED`."""

    def __init__(self, limits, credential, method, peer, refused) -> None:
        self.limits = limits
        self.credential = credential
        self.method = method
        self.peer = peer
        self.refused = refused


#: Set by :class:`AuthInterceptor` for each admitted call to a method in RATE_LIMITED.
_QUOTA: contextvars.ContextVar[_Quota | None] = contextvars.ContextVar(
    "tuanyuan_quota", default=None
)


class AlertCount:
    """One alert counted by :func:`new_alert_quota`; :meth:`keep` it once created."""

    def __init__(self) -> None:
        self.kept = False

    def keep(self) -> None:
        """The alert was created: it stays counted."""
        self.kept = True


@contextlib.contextmanager
def new_alert_quota() -> Iterator[AlertCount]:
    """Counts one new alert of the current caller against its ``alerts_per_minute``.

    Raises :class:`RateLimited` (RESOURCE_EXHAUSTED, logged as a refusal) when the caller
    created its limit's worth in the last minute; the message names the limit and when to
    retry. Otherwise the block runs with the alert counted, and the count stays only if
    the block calls :meth:`AlertCount.keep`: an idempotent repeat or a call that fails
    gives it back. Counting and checking happen together, with no ``await`` between, so
    concurrent calls on the event loop cannot exceed the limit. Calls without a limit
    (insecure mode, roles without ``alerts_per_minute``) are not counted.
    """
    quota, count = _QUOTA.get(), AlertCount()
    if quota is None:
        yield count
        return
    counted_at, wait_s = quota.limits.take(quota.credential)
    if wait_s:
        credential = quota.credential
        message = (
            f"credential {credential.name} may create at most {credential.alerts_per_minute} "
            f"new alerts a minute; retry in {math.ceil(wait_s)} s (repeating a request for an "
            "alert already created is not counted)"
        )
        quota.refused(
            Refusal(
                method=quota.method,
                peer=quota.peer,
                actor=credential.name,
                role=credential.role,
                code=grpc.StatusCode.RESOURCE_EXHAUSTED.name,
                message=message,
            )
        )
        raise RateLimited(message)
    try:
        yield count
    finally:
        if not count.kept and counted_at is not None:
            quota.limits.give_back(quota.credential, counted_at)


# The interceptor.


@dataclass(frozen=True)
class Refusal:
    """A call the interceptor turned away, for the audit trail."""

    method: str
    peer: str
    #: The credential's name; empty when the token was missing or unknown.
    actor: str
    #: The credential's role; empty when unknown.
    role: str
    #: The gRPC status code's name, e.g. ``PERMISSION_DENIED``.
    code: str
    message: str


class _RefusalLog:
    """Logs refusals, at most one line a minute per source and status code, with the
    count of those it held back, so that a flood of bad calls cannot drown the log.
    The source is the credential, or the peer's host when there is none."""

    INTERVAL_S = 60.0
    #: Sources remembered; past this the oldest are forgotten (each then logs again).
    MAX_SOURCES = 10_000

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: dict[tuple[str, str], list] = {}  # key -> [last logged at, held back]

    def refused(self, refusal: Refusal) -> None:
        source = refusal.actor or refusal.peer.rpartition(":")[0] or refusal.peer
        key = (source, refusal.code)
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.INTERVAL_S:
            seen[1] += 1
            return
        held_back = seen[1] if seen is not None else 0
        self._seen.pop(key, None)
        if len(self._seen) >= self.MAX_SOURCES:
            del self._seen[next(iter(self._seen))]
        self._seen[key] = [now, 0]
        _LOG.warning(
            "refused %s from %s%s: %s: %s%s",
            refusal.method,
            refusal.peer,
            f" (credential {refusal.actor})" if refusal.actor else "",
            refusal.code,
            refusal.message,
            f" ({held_back} more {refusal.code} from {source} since the last such line)"
            if held_back
            else "",
        )


def parse_bearer(value: str | bytes | None) -> tuple[str | None, str]:
    """The token of an ``authorization`` value ``Bearer <token>``, or None and why not."""
    if not value:
        return None, "missing credentials: send 'authorization: Bearer <token>'"
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None, "authorization must be 'Bearer <token>'"
    return token.strip(), ""


def _bearer(metadata) -> tuple[str | None, str]:
    """The token in gRPC metadata, or None and why not."""
    values = [value for key, value in metadata or () if key == "authorization"]
    if len(values) > 1:
        return None, "send one authorization header, not several"
    return parse_bearer(values[0] if values else None)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Admits a call only with a token of a role that may call its method.

    Refusals are made inside the call, with its context: a missing, malformed or
    unknown token ends it with UNAUTHENTICATED, a role that may not call the method with
    PERMISSION_DENIED. A refused call's request is never deserialized. An admitted
    call's handler runs unchanged (same serializers), with :func:`current_caller` set;
    in a method of :data:`RATE_LIMITED` the handler counts the alerts it creates with
    :func:`new_alert_quota`, which refuses an issuer over its ``alerts_per_minute`` with
    RESOURCE_EXHAUSTED. Only alerts created count: not calls, repeats or failures.

    ``on_refusal`` (optional) is called on the event loop with each :class:`Refusal`
    (those of :func:`new_alert_quota` too), e.g. to write it to the audit trail; it must
    not block.

    ``insecure_allow_all=True`` admits every call without a token as a caller of role
    :data:`INSECURE_ROLE`, which also passes :func:`check_gateway`. It exists for unit
    tests of handlers only; ``credentials`` must then be None.
    """

    def __init__(
        self,
        credentials: Credentials | None,
        limits: RateLimits | None = None,
        *,
        on_refusal: Callable[[Refusal], None] | None = None,
        insecure_allow_all: bool = False,
    ) -> None:
        if insecure_allow_all:
            if credentials is not None:
                raise ValueError("insecure_allow_all=True admits everyone: give no credentials")
            _LOG.warning("authentication is OFF: every caller may call every method")
        elif not isinstance(credentials, Credentials):
            raise TypeError("AuthInterceptor needs Credentials (or insecure_allow_all=True)")
        self.credentials = credentials
        self.limits = limits if limits is not None else RateLimits()
        self.on_refusal = on_refusal
        self.insecure_allow_all = insecure_allow_all
        self._log = _RefusalLog()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if isinstance(method, bytes):
            method = method.decode()
        if handler is None or method.lstrip("/").partition("/")[0] in OPEN_SERVICES:
            return handler

        # Decided here from the metadata; carried out inside the call, which has the
        # context to abort with and the peer to name.
        if self.insecure_allow_all:
            credential, code, message = None, None, ""
        else:
            credential, code, message = self._decide(
                method, handler_call_details.invocation_metadata
            )
        if code is not None:
            return _refusing(handler, self._refuse(method, credential, code, message))
        return _admitting(handler, self._admit(method, credential))

    def _decide(self, method: str, metadata):
        """(credential, None, "") to admit, or (credential or None, code, message)."""
        token, problem = _bearer(metadata)
        if token is None:
            return None, grpc.StatusCode.UNAUTHENTICATED, problem
        credential = self.credentials.find(token)
        if credential is None:
            return None, grpc.StatusCode.UNAUTHENTICATED, "unknown token"
        roles = METHOD_ROLES.get(method)
        if roles is None:
            return (
                credential,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} is not open to any credential",
            )
        if credential.role not in roles:
            return (
                credential,
                grpc.StatusCode.PERMISSION_DENIED,
                f"credential {credential.name} has role {credential.role}, which may not call "
                f"{method} (roles that may: {', '.join(sorted(roles))})",
            )
        return credential, None, ""

    def _refuse(self, method, credential, code, message):
        async def refuse(context):
            refusal = Refusal(
                method=method,
                peer=context.peer(),
                actor=credential.name if credential else "",
                role=credential.role if credential else "",
                code=code.name,
                message=message,
            )
            self._refused(refusal)
            await context.abort(code, message)

        return refuse

    def _refused(self, refusal: Refusal) -> None:
        self._log.refused(refusal)
        if self.on_refusal is not None:
            self.on_refusal(refusal)

    def _admit(self, method, credential):
        async def admit(context) -> None:
            if credential is None:  # insecure_allow_all
                _CALLER.set(Caller("insecure", INSECURE_ROLE, None, context.peer()))
                return
            peer = context.peer()
            _CALLER.set(Caller(credential.name, credential.role, credential.gateway, peer))
            if method in RATE_LIMITED:
                _QUOTA.set(_Quota(self.limits, credential, method, peer, self._refused))

        return admit


# Handlers around handlers. gRPC calls a streaming-response behaviour differently when it
# is an async generator (it iterates it) than when it is a coroutine function (which
# writes with context.write), so each wrapper keeps the kind of the behaviour it wraps.

_KINDS = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


def _rebuild(handler, wrap, request_deserializer):
    for kind, make in _KINDS:
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            return make(
                wrap(behaviour),
                request_deserializer=request_deserializer,
                response_serializer=handler.response_serializer,
            )
    raise TypeError("a method handler with no behaviour")


def _check_async(behaviour) -> None:
    if not (inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
        raise TypeError(
            f"AuthInterceptor wraps async handlers only; {behaviour!r} is neither a coroutine "
            "function nor an async generator function"
        )


def _admitting(handler, admit):
    def wrap(behaviour):
        _check_async(behaviour)
        if inspect.isasyncgenfunction(behaviour):

            async def stream(request, context):
                await admit(context)
                # aclosing: when the call ends early, the handler's own cleanup (its
                # finally blocks) runs now, in this call, not when the collector gets to it.
                async with contextlib.aclosing(behaviour(request, context)) as responses:
                    async for response in responses:
                        yield response

            return stream

        async def call(request, context):
            await admit(context)
            return await behaviour(request, context)

        return call

    return _rebuild(handler, wrap, handler.request_deserializer)


def _refusing(handler, refuse):
    def wrap(behaviour):
        _check_async(behaviour)
        if inspect.isasyncgenfunction(behaviour):

            async def stream(request, context):
                await refuse(context)
                yield  # never reached: refuse aborts; makes this an async generator

            return stream

        async def call(request, context):
            await refuse(context)

        return call

    # The bytes of a refused call are never parsed.
    return _rebuild(handler, wrap, _discard)


def _discard(_data: bytes) -> None:
    return None
