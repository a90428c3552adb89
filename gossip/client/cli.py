"""``gclient``: submit, look up and list messages on one node of a cluster.

    gclient --id 1 --message "Apple"     prints the new message's id
    gclient --id 5 --msgID <id>          prints the message (id prefixes work)
    gclient --id 4 --list                prints every message the node holds
    gclient --id 4 --status              prints the node's links and counts

Every failure is one line on stderr and a non-zero exit status: 1 when the
node refuses (not authenticated, rate limit, message rejected), is busy, closes
the connection (too many client connections) or cannot be reached, and for a
message no node would take (not UTF-8, empty or over the size limit: refused
before sending, as the node would refuse it); 2 for a usage or config mistake
(a bad --timeout, an unreadable --token-file).

Message bodies are printed with control characters escaped (``\n``, ``\t``,
``\x1b``...), so every message is one line and nothing a sender wrote can
drive the terminal; ``--raw`` prints them as stored.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import TimeoutError
from twisted.internet.task import react
from twisted.protocols import amp

from gossip.argtypes import OneLineParser, real
from gossip.client.api import (
    GossipClient,
    NodeClosedConnection,
    NodeUnreachable,
    client_token,
    message_problem,
)
from gossip.client.commands import (
    AmbiguousId,
    BadId,
    BadRequest,
    MessageRejected,
    NodeBusy,
    NotAuthenticated,
    NotFound,
    RateLimited,
)
from gossip.client.tokens import TokenError
from gossip.config import ConfigError, load_config
from gossip.core.message import SHORT_ID_CHARS
from gossip.locations import default_config


class CliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="gclient", description="Talk to one node of a gossip cluster.")
    p.add_argument("--id", type=int, required=True, help="the node to talk to")
    p.add_argument("--config", help="cluster file (default: $GOSSIP_CONFIG or the launcher's)")
    p.add_argument(
        "--timeout",
        type=real(above=0),
        default=30.0,
        help="seconds to wait for the node (a positive number; default 30)",
    )
    p.add_argument(
        "--token-file",
        help="file holding the client token (default: the cluster file's client_token_file)",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--message", help="submit this message; prints its id")
    what.add_argument("--msgID", help="print the message with this id (or a unique prefix)")
    what.add_argument("--list", action="store_true", help="print every message the node holds")
    what.add_argument("--status", action="store_true", help="print the node's links and counts")
    p.add_argument("--full-id", action="store_true", help="print whole ids, not the short form")
    p.add_argument("--ids", action="store_true", help="with --list: print 'id<TAB>message'")
    p.add_argument(
        "--raw",
        action="store_true",
        help="print message bodies as stored (default: control characters escaped)",
    )
    return p


_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def printable(text: str) -> str:
    """``text`` on one line with nothing a terminal acts on: control characters (C0, DEL,
    C1) and line/paragraph separators written as Python escapes (``\\n``, ``\\x1b``)."""
    if text.isprintable():
        return text
    out = []
    for c in text:
        code = ord(c)
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif code < 0x20 or 0x7F <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif c in "\u2028\u2029":
            out.append(f"\\u{code:04x}")
        else:
            out.append(c)
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = load_config(args.config or default_config())
        config.node(args.id)
        token, note = client_token(config, args.id, args.token_file)
    except (ConfigError, TokenError) as e:
        print(f"gclient: {e}", file=sys.stderr)
        return 2
    if args.message is not None:
        problem = message_problem(args.message, config.max_message_bytes)
        if problem is not None:
            print(f"gclient: {problem}; nothing was sent", file=sys.stderr)
            return 1
    args.token, args.token_note = token, note
    code = [0]

    async def run(reactor: Any) -> None:
        try:
            await _run(reactor, config, args)
        except CliError as e:
            print(f"gclient: {e}", file=sys.stderr)
            code[0] = e.code

    def start(reactor: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(run(reactor))

    try:
        react(start)
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 1
    return code[0]


async def _run(reactor: Any, config: Any, args: argparse.Namespace) -> None:
    spec = config.node(args.id)
    where = f"node {args.id} at {spec.client_address}"

    async def timed(d: Any) -> Any:
        return await Deferred.fromCoroutine(_await(d)).addTimeout(args.timeout, reactor)

    try:
        client = await timed(
            GossipClient.connect_endpoint(
                reactor,
                spec.client_address,
                name=where,
                token=args.token,
                max_message_bytes=config.max_message_bytes,
            )
        )
    except NodeUnreachable as e:
        raise CliError(f"node {args.id} at {e}") from None
    except TimeoutError:
        raise CliError(f"{where} did not answer within {args.timeout:g} s") from None
    except NotAuthenticated as e:
        raise CliError(str(e)) from None
    except NodeClosedConnection as e:
        raise CliError(str(e)) from None
    client.token_note = args.token_note
    try:
        await _command(client, args, timed)
    except TimeoutError:
        raise CliError(f"{where} did not answer within {args.timeout:g} s") from None
    except (
        MessageRejected,
        NodeBusy,
        RateLimited,
        NotAuthenticated,
        NotFound,
        AmbiguousId,
        BadId,
        BadRequest,
    ) as e:
        raise CliError(str(e)) from None
    except NodeClosedConnection as e:
        raise CliError(str(e)) from None
    except amp.RemoteAmpError as e:
        raise CliError(f"{where} failed: {e.description}") from None
    except (ConnectionError, amp.ProtocolSwitched) as e:
        raise CliError(f"lost the connection to {where}: {e}") from None
    finally:
        client.close()


async def _await(aw: Any) -> Any:
    return await aw


async def _command(client: GossipClient, args: argparse.Namespace, timed: Any) -> None:
    if args.message is not None:
        mid = await timed(client.submit_message(args.message))
        _out(mid if args.full_id else mid[:SHORT_ID_CHARS])
    elif args.msgID is not None:
        m = await timed(client.get_message(args.msgID))
        _out(m.body if args.raw else printable(m.body))
    elif args.list:
        pages = client.iter_pages()
        while True:
            try:
                page = await timed(pages.__anext__())
            except StopAsyncIteration:
                break
            for mid, body in page:
                short = mid if args.full_id else mid[:SHORT_ID_CHARS]
                body = body if args.raw else printable(body)
                _out(f"{short}\t{body}" if args.ids else body)
    else:
        s = await timed(client.status())
        _out(
            f"node {s['node_id']} of cluster {s['cluster']}: {s['message_count']} messages,"
            f" {s['dissemination']}, up {s['uptime']:.0f} s"
        )
        width = max([21, *(len(link["address"]) for link in s["links"])])
        _out(f"  {'link':<9} {'address':<{width}} {'state':<10} {'since':>10}")
        now = time.time()
        for link in s["links"]:
            age = max(0.0, now - link["since"])
            line = (
                f"  node {link['peer']:<4} {link['address']:<{width}} {link['state']:<10}"
                f" {age:8.1f} s"
            )
            if link["last_error"] and link["state"] != "up":
                line += f"  ({link['last_error']})"
            _out(line)
        if s["traffic"]:
            _out(f"  {'frames':<11} {'out':>9} {'bytes out':>12} {'in':>9} {'bytes in':>12}")
            for t in s["traffic"]:
                _out(
                    f"  {t['kind']:<11} {t['frames_out']:>9} {t['bytes_out']:>12}"
                    f" {t['frames_in']:>9} {t['bytes_in']:>12}"
                )
        for store in s["store"]:
            _out(
                f"  store: {store['durable']} durable ({store['policy']}),"
                f" {store['fsyncs']} fsyncs, last took {store['last_fsync_seconds'] * 1000:.2f} ms"
            )
        for sync in s["sync"]:
            _out(
                f"  re-sync sessions: {sync['sessions_completed']} done,"
                f" {sync['sessions_aborted']} aborted, {sync['messages_pulled']} messages pulled"
            )
        refused = [r for r in s.get("refused", []) if r["count"]]
        if refused:
            reasons = ", ".join(f"{r['reason']} {r['count']}" for r in refused)
            _out(f"  messages refused: {sum(r['count'] for r in refused)} ({reasons})")
        dropped = [r for r in s.get("disconnects", []) if r["count"]]
        if dropped:
            reasons = ", ".join(f"{r['reason']} {r['count']}" for r in dropped)
            _out(f"  peers disconnected: {sum(r['count'] for r in dropped)} ({reasons})")


def _out(line: str) -> None:
    try:
        sys.stdout.write(line + "\n")
    except BrokenPipeError:
        raise SystemExit(0) from None
