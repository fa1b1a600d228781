"""Operator commands for credentials and the audit trail.

- ``credentials new --name N --role R [--gateway G]`` makes a token and prints it once
  (on stderr) and the ``[[credential]]`` entry holding its hash (on stdout, so that
  ``>> credentials.toml`` appends just the entry).
- ``credentials check FILE`` validates a credentials file.
- ``audit verify --file F`` or ``--redis URL [--redis-prefix P | --key K]`` checks an
  audit trail's chain:
  exit status 0 when intact, 1 naming the first bad entry otherwise.

Operator mistakes (a bad flag, an unreadable file, an unreachable Redis) print one line
``tuanyuan: ...`` on stderr and exit with status 2.

For ``tuanyuan serve`` and the client commands: :func:`add_server_flags` with
:func:`server_security`, and :func:`add_client_flags` with :func:`client_channel`.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from engine import audit, auth, client, tls

#: Where ``tuanyuan serve --dev`` writes the tokens it makes, and where local clients
#: look for them (``$TUANYUAN_DEV_TOKENS`` or ``~/.tuanyuan/dev-tokens.json``).
DEFAULT_DEV_TOKENS = Path(
    os.environ.get("TUANYUAN_DEV_TOKENS") or Path.home() / ".tuanyuan" / "dev-tokens.json"
)
#: Gateways that get dev credentials.
DEV_GATEWAYS = (0, 1, 2, 3)


class SecurityUsageError(ValueError):
    """A bad combination of security flags; the message names the flag."""


class _Usage(Exception):
    pass


def _operator_errors(handler):
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (_Usage, auth.CredentialsError) as error:
            message = str(error)
        except OSError as error:
            message = f"{error.filename or 'file'}: {error.strerror or error}"
        print(f"tuanyuan: {message}", file=sys.stderr)
        return 2

    return run


@_operator_errors
def credentials_new(args: argparse.Namespace) -> int:
    credential, token = auth.new_credential(
        args.name, args.role, args.gateway, args.alerts_per_minute
    )
    print(
        f"token for {credential.describe()}, shown this once; hand it to the client over a "
        f"safe channel and do not store it in the credentials file:\n{token}",
        file=sys.stderr,
    )
    print(auth.to_toml(credential), end="")
    return 0


@_operator_errors
def credentials_check(args: argparse.Namespace) -> int:
    credentials = auth.Credentials.load(args.file)
    by_role = collections.defaultdict(list)
    for credential in credentials:
        by_role[credential.role].append(credential)
    print(f"{args.file}: {len(credentials)} valid credentials")
    for role in auth.ROLES:
        for credential in by_role.get(role, ()):
            detail = ""
            if credential.gateway is not None:
                detail = f", gateway {credential.gateway}"
            elif credential.alerts_per_minute is not None:
                detail = f", {credential.alerts_per_minute} alerts a minute"
            print(f"  {credential.name}: {role}{detail}")
    return 0


@_operator_errors
def audit_verify(args: argparse.Namespace) -> int:
    head_problem = ""
    if args.redis:
        import redis

        args.key = args.key or args.redis_prefix + "audit"
        connection = redis.Redis.from_url(args.redis)
        where = f"{args.redis} stream {args.key}"
        try:
            if not connection.exists(args.key):
                raise _Usage(f"{where}: no such stream")
            # The journal keeps "seq hash" of the newest entry beside the stream; a
            # stream without that entry lost entries off its end, which the chain alone
            # cannot show. Read first, so that entries appended meanwhile do no harm.
            head = connection.get(args.key + ":head")
            check_head = _HeadCheck(head, args.key) if head is not None else None
            entries = audit.read_redis(connection, args.key)
            report = audit.verify(check_head.tap(entries) if check_head else entries)
            head_problem = check_head.problem(report) if check_head else ""
        except redis.RedisError as error:
            raise _Usage(f"{args.redis}: {error}") from None
        finally:
            connection.close()
    else:
        where = args.file
        try:
            report = audit.verify(audit.read_file(args.file))
        except audit.AuditError as error:
            print(f"tuanyuan: audit trail damaged: {error}", file=sys.stderr)
            return 1
    if report.ok and not head_problem:
        print(f"{where}: {report.message()}")
        return 0
    problem = head_problem if report.ok else report.message()
    print(f"tuanyuan: audit trail {where} is not intact: {problem}", file=sys.stderr)
    return 1


class _HeadCheck:
    """Compares the journal's head record ``seq hash`` with the stream's entry ``seq``."""

    def __init__(self, head: bytes | str, key: str) -> None:
        text = head.decode() if isinstance(head, bytes) else head
        self.seq, _, self.hash = text.partition(" ")
        self.key = key
        self.found: str | None = None

    def tap(self, entries):
        for entry in entries:
            if entry.get("seq") == self.seq:
                self.found = entry.get("hash")
            yield entry

    def problem(self, report: audit.VerifyReport) -> str:
        if self.found == self.hash:
            return ""
        if self.found is None:
            return (
                f"{self.key}:head records seq {self.seq}, but the stream ends at seq "
                f"{report.count}: entries were cut off its end"
            )
        return f"{self.key}:head records another hash for seq {self.seq} than the stream's"


def _gateway(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= auth.MAX_GATEWAY:
        raise argparse.ArgumentTypeError(f"must be 0 to {auth.MAX_GATEWAY}, got {text!r}")
    return value


def add_commands(commands) -> None:
    """Adds ``credentials`` and ``audit`` to the ``tuanyuan`` parser (``commands`` is its
    subparsers object)."""
    parser = commands.add_parser(
        "credentials",
        help="make tokens and check credentials files",
        description=auth.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    new = actions.add_parser(
        "new",
        help="a fresh token and its [[credential]] entry",
        description="Prints a fresh 256-bit token on stderr, once, and the [[credential]] "
        "entry with its SHA-256 on stdout: `tuanyuan credentials new ... >> FILE` appends "
        "the entry and shows the token.",
    )
    new.add_argument("--name", required=True, help="unique name, shown in logs and the audit")
    new.add_argument("--role", required=True, choices=auth.ROLES)
    new.add_argument(
        "--gateway", type=_gateway, help="reporter and gateway roles: the gateway id, 0 to 65535"
    )
    new.add_argument(
        "--alerts-per-minute",
        type=int,
        help=f"issuer role: CreateAlert calls a minute ({auth.DEFAULT_ALERTS_PER_MINUTE})",
    )
    new.set_defaults(handler=credentials_new)
    check = actions.add_parser("check", help="validate a credentials file")
    check.add_argument("file", help="credentials file (TOML)")
    check.set_defaults(handler=credentials_check)

    parser = commands.add_parser(
        "audit",
        help="check the audit trail",
        description=audit.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = actions.add_parser(
        "verify",
        help="check the hash chain of an audit trail",
        description="Exit status 0 when the trail is intact, 1 naming its first bad entry.",
    )
    source = verify.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", help="a trail in JSON lines")
    source.add_argument("--redis", help="a Redis URL, e.g. redis://127.0.0.1:6379/0")
    verify.add_argument(
        "--redis-prefix",
        default="tuanyuan:",
        help="with --redis: the key prefix of the engine (serve --redis-prefix) whose trail "
        "to check, in its stream PREFIXaudit (tuanyuan:)",
    )
    verify.add_argument(
        "--key", help="with --redis: the stream itself, instead of --redis-prefix's"
    )
    verify.set_defaults(handler=audit_verify)


# Flags of `tuanyuan serve`.


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security")
    group.add_argument(
        "--credentials",
        type=Path,
        help="credentials file (TOML; see `tuanyuan credentials --help`); required without --dev",
    )
    group.add_argument(
        "--dev-tokens",
        type=Path,
        default=DEFAULT_DEV_TOKENS,
        help="with --dev and no --credentials: where to write the generated tokens "
        f"(mode 0600; {DEFAULT_DEV_TOKENS}, or $TUANYUAN_DEV_TOKENS)",
    )
    group.add_argument("--tls-cert", type=Path, help="server certificate (PEM); enables TLS")
    group.add_argument("--tls-key", type=Path, help="private key of --tls-cert (PEM)")
    group.add_argument(
        "--tls-client-ca", type=Path, help="require client certificates signed by this CA (PEM)"
    )


@dataclass(frozen=True)
class ServerSecurity:
    credentials: auth.Credentials
    #: None: plain TCP.
    tls: tls.ServerTLS | None
    #: Where dev tokens were written; None with a credentials file.
    dev_tokens: Path | None
    #: The dev tokens by credential name; empty with a credentials file.
    dev_token_values: dict[str, str] = field(default_factory=dict, repr=False)


def dev_credentials_text(security: ServerSecurity) -> str:
    """What ``tuanyuan serve --dev`` prints at start: each generated credential's name,
    role, gateway and token, labelled as development credentials. Empty with a credentials file."""
    tokens = security.dev_token_values
    if not tokens:
        return ""
    rows = [("name", "role", "gateway", "token")] + [
        (c.name, c.role, "-" if c.gateway is None else str(c.gateway), tokens[c.name])
        for c in security.credentials
        if c.name in tokens
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        "DEVELOPMENT CREDENTIALS (serve --dev): for a local engine only, new at every start; "
        f"also in {security.dev_tokens}",
        *(
            f"  {name:<{widths[0]}}  {role:<{widths[1]}}  {gateway:<{widths[2]}}  {token}"
            for name, role, gateway, token in rows
        ),
    ]
    return "\n".join(lines)


def server_security(args: argparse.Namespace, dev: bool, gateways=DEV_GATEWAYS) -> ServerSecurity:
    """The credentials and TLS files the flags of :func:`add_server_flags` name.

    Without ``--credentials``, ``dev`` must be true: fresh credentials are made for an
    issuer, an operator and a reporter and a gateway of each of ``gateways``, their
    tokens written to ``--dev-tokens`` and returned for :func:`dev_credentials_text`.
    There is no way to run without credentials.
    Raises SecurityUsageError, CredentialsError or TLSError (all ValueErrors).
    """
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SecurityUsageError("give --tls-cert and --tls-key together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise SecurityUsageError("--tls-client-ca needs --tls-cert and --tls-key")
    files = None
    if args.tls_cert is not None:
        files = tls.ServerTLS(args.tls_cert, args.tls_key, args.tls_client_ca)
        files.ssl_context()  # reads the files and matches key and certificate now

    if args.credentials is not None:
        return ServerSecurity(auth.Credentials.load(args.credentials), files, None)
    if not dev:
        raise SecurityUsageError(
            "give --credentials FILE (make entries with `tuanyuan credentials new`), or --dev "
            "to run a local engine with generated credentials"
        )
    credentials, tokens = auth.dev_credentials(gateways)
    path = Path(args.dev_tokens)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    auth.write_dev_tokens(path, tokens)
    return ServerSecurity(credentials, files, path, dict(tokens))


# Flags of the client commands.


def add_client_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security")
    group.add_argument(
        "--token-file",
        type=Path,
        help="file holding the bearer token (default: $TUANYUAN_TOKEN, else the dev token "
        "of a --dev engine on this machine)",
    )
    group.add_argument("--tls-ca", type=Path, help="CA of the server's certificate; enables TLS")
    group.add_argument("--tls-cert", type=Path, help="client certificate, for mutual TLS")
    group.add_argument("--tls-key", type=Path, help="private key of --tls-cert")


def client_token(args: argparse.Namespace, target: str, dev_name: str) -> str | None:
    """The token of a client command: ``--token-file``, else ``$TUANYUAN_TOKEN``, else
    credential ``dev_name`` from the dev tokens file when the engine is on this
    machine, else None. Tokens are never taken from the command line, where other
    users could read them in the process list."""
    if args.token_file is not None:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise SecurityUsageError(
                f"--token-file {args.token_file}: {error.strerror or error}"
            ) from None
        if not token:
            raise SecurityUsageError(f"--token-file {args.token_file} is empty")
        return token
    if os.environ.get("TUANYUAN_TOKEN"):
        return os.environ["TUANYUAN_TOKEN"].strip()
    if client.is_loopback(target) and DEFAULT_DEV_TOKENS.is_file():
        try:
            return auth.read_dev_tokens(DEFAULT_DEV_TOKENS).get(dev_name)
        except ValueError:
            return None
    return None


def client_channel(
    args: argparse.Namespace, target: str, dev_name: str = "dev-issuer"
) -> grpc.Channel:
    """A channel to ``target`` with the token and TLS files of :func:`add_client_flags`."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SecurityUsageError("give --tls-cert and --tls-key together")
    token = client_token(args, target, dev_name)
    secure = args.tls_ca is not None or args.tls_cert is not None
    if token is not None and not secure and not client.is_loopback(target):
        raise SecurityUsageError(
            f"refusing to send a token in clear text to {target}: give --tls-ca (the CA of "
            "the engine's certificate)"
        )
    return client.connect(
        target, token=token, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key
    )
