"""``gclient``: submit, look up and list messages on one node of a cluster.

    gclient --id 1 --message "Apple"     prints the new message's id
    gclient --id 5 --msgID <id>          prints the message (id prefixes work)
    gclient --id 4 --list                prints every message the node holds
    gclient --id 4 --status              prints the node's links and counts
    gclient --id 1 --trace <id>          the message on every node: when, hops, path
    gclient --id 1 --follow              prints messages as the node receives them
    gclient --cluster-stats --window 60  cluster-wide figures over the last 60 s

``--json`` makes --status, --list, --msgID, --trace and --cluster-stats print JSON
(--follow: one object per line), for scripts.

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
import json
import sys
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import TimeoutError
from twisted.internet.task import react
from twisted.protocols import amp

from gossip.argtypes import OneLineParser, real
from gossip.client.analytics import trace, window_stats
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
from gossip.core.message import SHORT_ID_CHARS, id_text
from gossip.locations import default_config


class CliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="gclient", description="Talk to one node of a gossip cluster.")
    p.add_argument("--id", type=int, help="the node to talk to (all but --cluster-stats)")
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
    what.add_argument(
        "--trace",
        metavar="ID",
        help="ask every node of the cluster file for this message: arrival, hops, path",
    )
    what.add_argument(
        "--follow", action="store_true", help="print messages as the node receives them"
    )
    what.add_argument(
        "--cluster-stats",
        action="store_true",
        help="cluster-wide figures over the last --window seconds (asks every node)",
    )
    p.add_argument(
        "--window", type=float, default=60.0, help="seconds back for --cluster-stats (60)"
    )
    p.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    p.set_defaults(token=None, token_note="")  # filled in by main from --token-file
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
    if args.id is None and not args.cluster_stats:
        print("gclient: --id is required (except with --cluster-stats)", file=sys.stderr)
        return 2
    if args.window <= 0:
        print("gclient: --window must be a positive number of seconds", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config or default_config())
        if args.id is not None:
            config.node(args.id)
        if args.id is not None:
            token, note = client_token(config, args.id, args.token_file)
        else:  # --cluster-stats: each node's own token is read when it is asked
            token, note = None, ""
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
    if args.cluster_stats or args.trace is not None:
        await _cluster_command(reactor, config, args)
        return
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
        shown = mid if args.full_id else mid[:SHORT_ID_CHARS]
        _out(json.dumps({"id": mid}) if args.json else shown)
    elif args.msgID is not None:
        m = await timed(client.get_message(args.msgID))
        if args.json:
            _out(json.dumps(_message_json(m)))
        else:
            _out(m.body if args.raw else printable(m.body))
    elif args.list:
        pages = client.iter_pages()
        if args.json:
            _out("[")
        first = True
        while True:
            try:
                page = await timed(pages.__anext__())
            except StopAsyncIteration:
                break
            for mid, body in page:
                if args.json:  # streamed: a listing may not fit in memory twice
                    _out(("  " if first else ", ") + json.dumps({"id": mid, "body": body}))
                    first = False
                    continue
                short = mid if args.full_id else mid[:SHORT_ID_CHARS]
                body = body if args.raw else printable(body)
                _out(f"{short}\t{body}" if args.ids else body)
        if args.json:
            _out("]")
    elif args.follow:
        await _follow(client, args)
    elif args.json:
        _out(json.dumps(await timed(client.status()), indent=2))
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
        for overlay in s.get("overlay") or []:
            _print_overlay(overlay)
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


def _print_overlay(o: dict[str, Any]) -> None:
    """The dynamic overlay's lines of ``gclient --status``."""
    suspects = ", ".join(
        f"{p} ({age:.1f} s)" for p, age in zip(o["suspects"], o["suspect_for"], strict=False)
    )
    _out(
        f"  overlay: neighbours {', '.join(map(str, o['neighbours'])) or 'none'};"
        f" suspects {suspects or 'none'};"
        f" unreachable {', '.join(map(str, o['unreachable'])) or 'none'};"
        f" {o['members']} live nodes"
        + (f"; local health {o['health']} (suspicion waits longer)" if o["health"] else "")
        + (f"; {o['bad_records']} bad records dropped" if o["bad_records"] else "")
    )
    for at, what in zip(o["change_times"], o["changes"], strict=False):
        _out(f"    {time.strftime('%H:%M:%S', time.localtime(at))}  {what}")


def _message_json(m: Any) -> dict[str, Any]:
    return {
        "id": m.id,
        "body": m.body,
        "received_at": m.received_at,
        "path": list(m.path),
        "hops": len(m.path),
        "via": m.via,
        "redundant_copies": m.duplicates,
    }


# Ids a --follow may hold not yet printed (16 bytes each).
FOLLOW_BACKLOG = 100_000


async def _follow(client: GossipClient, args: argparse.Namespace) -> None:
    """Print each message as the node holds it durably, from now on, until the node
    closes the connection (or Ctrl-C). Bodies are fetched one at a time, in order."""
    from twisted.internet.defer import DeferredQueue

    queue: DeferredQueue[bytes | None] = DeferredQueue()
    lost = client.proto.connectionLost

    def connection_lost(reason: Any) -> None:
        queue.put(None)  # the node closed the connection (or stopped): done
        lost(reason)

    client.proto.connectionLost = connection_lost  # type: ignore[method-assign]
    status = await client.status()
    now = status["store"][0]["durable"] if status["store"] else status["message_count"]

    behind = [False]

    def delivered(_start: int, ids: list[bytes]) -> None:
        # Bounded: a follower printing slower than the node receives falls behind by at
        # most FOLLOW_BACKLOG ids, then stops with one line instead of growing.
        if len(queue.pending) + len(ids) > FOLLOW_BACKLOG:
            behind[0] = True
            queue.put(None)
            return
        for mid in ids:
            queue.put(mid)

    await client.watch(delivered, start=now)
    while True:
        mid = await queue.get()
        if behind[0]:
            raise CliError(
                f"fell over {FOLLOW_BACKLOG} messages behind {client.name}; follow again,"
                " or use --list"
            )
        if mid is None:
            raise CliError(f"{client.name} closed the connection")
        m = await client.get_message(id_text(mid))
        if args.json:
            _out(json.dumps(_message_json(m)))
        else:
            short = m.id if args.full_id else m.id[:SHORT_ID_CHARS]
            route = "->".join(str(n) for n in m.path) or "submitted here"
            _out(f"{short}\t{m.body}\t(hops {len(m.path)}: {route})")
        sys.stdout.flush()


async def _each_node(
    reactor: Any, config: Any, args: argparse.Namespace, ask: Any
) -> dict[int, Any]:
    """``ask(client)`` on every node of the cluster file at once; None for a node that
    cannot be reached or fails (a trace or stats over the others is still useful)."""
    from twisted.internet import defer

    async def one(node_id: int) -> Any:
        spec = config.node(node_id)
        try:
            token, _note = client_token(config, node_id, args.token_file)
            client = await GossipClient.connect_endpoint(
                reactor,
                spec.client_address,
                timeout=args.timeout,
                name=f"node {node_id}",
                token=token,
            )
        except Exception:
            return None
        try:
            d = Deferred.fromCoroutine(_await(ask(client))).addTimeout(args.timeout, reactor)
            return await d
        except NotFound:
            return None
        except Exception as e:
            print(f"gclient: node {node_id}: {e}", file=sys.stderr)
            return None
        finally:
            client.close()

    ids = sorted(config.nodes)
    results = await defer.gatherResults([Deferred.fromCoroutine(one(n)) for n in ids])
    return dict(zip(ids, results, strict=True))


async def _cluster_command(reactor: Any, config: Any, args: argparse.Namespace) -> None:
    nodes = sorted(config.nodes)
    if args.trace is not None:
        # Resolve the prefix on the given node first: one clear error if it is unknown.
        spec = config.node(args.id)
        where = f"node {args.id} at {spec.client_address}"
        try:
            client = await GossipClient.connect_endpoint(
                reactor, spec.client_address, timeout=args.timeout, name=where, token=args.token
            )
        except NodeUnreachable as e:
            raise CliError(f"node {args.id} at {e}") from None
        try:
            m = await client.get_message(args.trace)
        except (NotFound, AmbiguousId, BadId) as e:
            raise CliError(str(e)) from None
        finally:
            client.close()

        async def ask(c: GossipClient) -> Any:
            got = await c.get_message(m.id)
            return _message_json(got) | {"duplicates": got.duplicates}

        copies = await _each_node(reactor, config, args, ask)
        report = trace(copies, nodes) | {"id": m.id}
        if args.json:
            _out(json.dumps(report, indent=2))
            return
        _trace_text(report)
        return
    now = time.time()
    since = now - args.window
    arrivals = await _each_node(reactor, config, args, lambda c: c.arrivals(since))
    statuses = await _each_node(reactor, config, args, lambda c: c.status())
    stats = window_stats(
        {n: a for n, a in arrivals.items() if a is not None},
        {n: s for n, s in statuses.items() if s is not None},
        nodes,
        since,
    ) | {"window_seconds": args.window}
    if args.json:
        _out(json.dumps(stats, indent=2))
        return
    _stats_text(stats)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _trace_text(r: dict[str, Any]) -> None:
    _out(
        f"message {r['id']}: on {r['holding']} of {r['nodes']} nodes,"
        f" full coverage after {_ms(r['full_coverage_seconds'])},"
        f" redundant copies {'-' if r['redundant_copies'] is None else r['redundant_copies']}"
    )
    _out(f"  {'node':>4} {'after':>10} {'hops':>4} {'via':<6} {'redundant':>9}  path")
    rows = sorted(r["copies"], key=lambda c: (not c["held"], c.get("after_seconds") or 0))
    for c in rows:
        if not c["held"]:
            _out(f"  {c['node']:>4} {'missing':>10}")
            continue
        dup = c["redundant_copies"]
        _out(
            f"  {c['node']:>4} {_ms(c['after_seconds']):>10} {c['hops']:>4} {c['via']:<6}"
            f" {'?' if dup < 0 else dup:>9}  {' -> '.join(map(str, c['path']))}"
        )


def _stats_text(s: dict[str, Any]) -> None:
    cov = s["mean_coverage"]
    per = s["redundant_copies_per_message"]
    _out(f"last {s['window_seconds']:g} s, {s['nodes_reporting']} of {s['nodes']} nodes answering:")
    _out(f"  messages                 {s['messages']}")
    _out(f"  mean coverage            {'-' if cov is None else f'{cov:.1%}'}")
    _out(f"  fully covered            {s['fully_covered']}")
    _out(
        f"  time to full coverage    p50 {_ms(s['full_coverage_seconds_p50'])},"
        f" p99 {_ms(s['full_coverage_seconds_p99'])}"
    )
    _out(f"  redundant copies/message {'-' if per is None else f'{per:.2f}'}")
    _out(f"  link flaps               {s['link_flaps']}")
    _out(
        f"  re-sync                  {s['resync_messages']} messages,"
        f" {s['resync_body_bytes']} body bytes"
    )


def _out(line: str) -> None:
    try:
        sys.stdout.write(line + "\n")
    except BrokenPipeError:
        raise SystemExit(0) from None
