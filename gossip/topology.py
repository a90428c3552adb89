"""Cluster graphs: a generator of low-diameter regular graphs and ``gossip-config``.

``generate_graph`` returns the links of a connected graph over ids 1..n in
which every node has the same degree. For 16 nodes of degree 3 it is a fixed
graph of diameter 3, the optimum (Moore bound). Otherwise it draws random
regular graphs (deterministic for a seed), keeps the one with the lowest
diameter, then the lowest mean shortest path, and improves it by edge swaps
that keep every degree. The search is bounded by a fixed amount of BFS work,
so it shrinks as n grows: n = 1000 gets one random graph in well under a
second.

``gossip-config --nodes 16 [-o cluster.toml]`` writes a cluster file;
``gossip-config --check cluster.toml`` validates one;
``gossip-config --settings-markdown`` prints the README's configuration reference.
For nodes on several hosts, ``--host-template "gossip-{index}.gossip"`` gives
each node its own host name, every node the same two ports, and a wildcard
listen interface.
"""

from __future__ import annotations

import ipaddress
import math
import random
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from gossip.argtypes import OneLineParser, whole
from gossip.config import (
    DEGREE,
    ClusterConfig,
    ConfigError,
    config_from_dict,
    dump_config,
    listen_description,
    load_config,
)
from gossip.settings import settings_markdown

Edge = tuple[int, int]

# The known-optimal 16-node cubic graph (/work/shared/topology16.json, ids + 1):
# diameter 3, mean shortest path 2.2.
TOPOLOGY16: tuple[Edge, ...] = (
    (1, 7), (1, 11), (1, 15), (2, 12), (2, 13), (2, 16), (3, 8), (3, 11),
    (3, 12), (4, 7), (4, 10), (4, 13), (5, 6), (5, 13), (5, 14), (6, 7),
    (6, 8), (8, 9), (9, 14), (9, 15), (10, 12), (10, 15), (11, 16), (14, 16),
)  # fmt: skip

# Bound on the BFS work spent scoring candidate graphs: each score costs at
# most n * n * degree edge visits. n = 1000 gets a single random draw (about
# 0.2 s); n = 200 about 1 s of search.
_WORK_BUDGET = 25_000_000
_MAX_EVALS = 3000
_MIN_EVALS = 10
_MAX_DRAWS = 20
_DRAWS_PER_ATTEMPT = 50


def generate_graph(n: int, degree: int = DEGREE, seed: int = 0) -> list[Edge]:
    """Sorted (low, high) edges of a connected ``degree``-regular graph on ids 1..n."""
    _check_regular(n, degree)
    if n == 16 and degree == 3:
        return sorted(TOPOLOGY16)
    if degree == n - 1:  # complete graph (covers n = 1 and n = 2)
        return [(a, b) for a in range(1, n + 1) for b in range(a + 1, n + 1)]
    if degree == 2:  # every connected 2-regular graph is a ring
        return sorted((min(i, i % n + 1), max(i, i % n + 1)) for i in range(1, n + 1))
    rng = random.Random(seed)
    evals = min(_MAX_EVALS, _WORK_BUDGET // (n * n * degree))
    if evals < _MIN_EVALS:  # large n: one random graph; its diameter is near log2(n) + 3
        best = _draw(n, degree, rng)
    else:
        best, score = None, (n, n**3)  # worse than any graph
        for _ in range(min(_MAX_DRAWS, max(1, evals // 10))):
            adj = _draw(n, degree, rng)
            found = _score(adj, score) if adj is not None else None
            evals -= 1
            if found is not None:
                best, score = adj, found
        if best is not None:
            _improve(best, score, rng, evals)
    if best is None:  # not seen in practice; a circulant graph is always valid
        best = _circulant(n, degree)
    return sorted((a + 1, b + 1) for a, nbs in enumerate(best) for b in nbs if a < b)


def _check_regular(n: int, degree: int) -> None:
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    if n <= degree:
        raise ValueError(f"a node of degree {degree} needs at least {degree + 1} nodes, got {n}")
    if n * degree % 2:
        raise ValueError(f"n * degree must be even (every edge has two ends), got {n} * {degree}")
    if degree < 2 and n > degree + 1:
        raise ValueError(
            f"a connected graph of degree {degree} has exactly {degree + 1} nodes, got {n}"
        )


def _draw(n: int, degree: int, rng: random.Random) -> list[set[int]] | None:
    """A random simple ``degree``-regular graph on 0..n-1, or None after many failures.

    Dense graphs are drawn as the complement of a sparse one: a regular graph
    of degree >= n/2 is always connected.
    """
    if degree > (n - 1) // 2:
        co = _pairing(n, n - 1 - degree, rng)
        if co is None:
            return None
        return [set(range(n)) - co[v] - {v} for v in range(n)]
    for _ in range(_DRAWS_PER_ATTEMPT):
        adj = _pairing(n, degree, rng)
        if adj is not None and _connected(adj):
            return adj
    return None


def _pairing(n: int, degree: int, rng: random.Random) -> list[set[int]] | None:
    """Pair up random free edge ends, refusing self-links and parallel edges."""
    for _ in range(_DRAWS_PER_ATTEMPT):
        ends = [v for v in range(n) for _ in range(degree)]
        adj: list[set[int]] = [set() for _ in range(n)]
        while ends:
            m = len(ends)
            for _ in range(4 * m + 20):
                i, j = rng.randrange(m), rng.randrange(m)
                u, v = ends[i], ends[j]
                if u != v and v not in adj[u]:
                    break
            else:
                break  # stuck near the end: start over
            for k in (max(i, j), min(i, j)):
                ends[k] = ends[-1]
                ends.pop()
            adj[u].add(v)
            adj[v].add(u)
        if not ends:
            return adj
    return None


def _improve(
    adj: list[set[int]], score: tuple[int, int], rng: random.Random, steps: int
) -> tuple[int, int]:
    """Hill-climb by edge swaps: {a-b, c-d} -> {a-c, b-d} keeps every degree.

    A swap stays when (diameter, sum of distances) does not get worse, so the
    search can walk across plateaus.
    """
    n = len(adj)
    edges = [(a, b) for a in range(n) for b in sorted(adj[a]) if a < b]
    for _ in range(steps):
        i, j = rng.randrange(len(edges)), rng.randrange(len(edges))
        (a, b), (c, d) = edges[i], edges[j]
        if rng.random() < 0.5:
            c, d = d, c
        if len({a, b, c, d}) < 4 or c in adj[a] or d in adj[b]:
            continue
        _swap(adj, (a, b), (c, d), (a, c), (b, d))
        found = _score(adj, (score[0], score[1] + 1))
        if found is None:
            _swap(adj, (a, c), (b, d), (a, b), (c, d))
        else:
            score = found
            edges[i], edges[j] = (a, c), (b, d)
    return score


def _swap(adj: list[set[int]], *edges: Edge) -> None:
    """Remove the first two edges, add the last two."""
    for a, b in edges[:2]:
        adj[a].discard(b)
        adj[b].discard(a)
    for a, b in edges[2:]:
        adj[a].add(b)
        adj[b].add(a)


def _circulant(n: int, degree: int) -> list[set[int]]:
    """Node i linked to i +- 1..degree//2, and to i + n/2 when degree is odd."""
    offsets = list(range(1, degree // 2 + 1))
    adj: list[set[int]] = [set() for _ in range(n)]
    for v in range(n):
        for o in offsets:
            adj[v] |= {(v + o) % n, (v - o) % n}
        if degree % 2:
            adj[v].add((v + n // 2) % n)
    return adj


def _connected(adj: Sequence[Iterable[int]]) -> bool:
    seen = {0}
    todo = [0]
    while todo:
        for v in adj[todo.pop()]:
            if v not in seen:
                seen.add(v)
                todo.append(v)
    return len(seen) == len(adj)


def _score(adj: Sequence[Iterable[int]], bound: tuple[int, int]) -> tuple[int, int] | None:
    """(diameter, sum of all distances), or None if disconnected or not below ``bound``.

    Both parts only grow as sources are added, so a candidate is dropped as
    soon as it cannot beat ``bound``.
    """
    n = len(adj)
    lists = [list(a) for a in adj]
    diam = total = 0
    for s in range(n):
        dist = [-1] * n
        dist[s] = 0
        frontier = [s]
        d = reached = 0
        while frontier:
            d += 1
            nxt = []
            for u in frontier:
                for v in lists[u]:
                    if dist[v] < 0:
                        dist[v] = d
                        nxt.append(v)
            reached += len(nxt)
            total += d * len(nxt)
            frontier = nxt
        if reached != n - 1:
            return None
        diam = max(diam, d - 1)
        if diam > bound[0] or (diam == bound[0] and total >= bound[1]):
            return None
    return diam, total


def _adjacency(edges: Iterable[Edge]) -> list[list[int]]:
    ids: dict[int, int] = {}
    pairs = []
    for a, b in edges:
        pairs.append((ids.setdefault(a, len(ids)), ids.setdefault(b, len(ids))))
    adj: list[list[int]] = [[] for _ in ids]
    for a, b in pairs:
        adj[a].append(b)
        adj[b].append(a)
    return adj


def _distances(edges: Iterable[Edge]) -> tuple[int, float]:
    adj = _adjacency(edges)
    n = len(adj)
    if n < 2:
        return 0, 0.0
    score = _score(adj, (n, n * n * n))
    if score is None:
        raise ValueError("the graph is not connected")
    return score[0], score[1] / (n * (n - 1))


def diameter(edges: Iterable[Edge]) -> int:
    """The longest shortest path (in hops) of a connected graph given by its edges."""
    return _distances(edges)[0]


def mean_shortest_path(edges: Iterable[Edge]) -> float:
    """The mean hop count over all ordered pairs of distinct nodes."""
    return _distances(edges)[1]


LOOPBACK = "127.0.0.1"
BASE_PORT = 17000  # one host for all: node i listens on 17000 + i (peers), 17100 + i (clients)
PEER_PORT = 17001  # a host per node: every node listens on these two
CLIENT_PORT = 17101
WEB_PORT = 17201  # a host per node with --web: every node's HTTP site


def host_names(template: str, n: int) -> list[str]:
    """The host of nodes 1..n: ``{id}`` is the node id, ``{index}`` is id - 1 (a pod ordinal)."""
    try:
        hosts = [template.format(id=i, index=i - 1) for i in range(1, n + 1)]
    except KeyError as e:
        problem = f"unknown placeholder {{{e.args[0]}}}"
    except (IndexError, ValueError) as e:
        problem = str(e)
    else:
        return hosts
    raise ValueError(f"bad host template {template!r}: {problem} (placeholders: {{id}}, {{index}})")


def default_interface(host: str) -> str:
    """Where a node listens when not told: its host if that is an IP literal, else every
    interface (a host name may not resolve, or not to this machine's address, at start)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "0.0.0.0"
    return host


def generate_config(
    n: int,
    *,
    name: str = "local",
    host: str = LOOPBACK,
    base_peer_port: int = BASE_PORT,
    base_client_port: int | None = None,
    seed: int = 0,
    peer_port: int | None = None,
    client_port: int | None = None,
    listen_interface: str | None = None,
    web: bool = False,
    web_port: int | None = None,
) -> ClusterConfig:
    """A cluster of n degree-3 nodes.

    ``host`` is a template (``{id}``, ``{index}``). When it gives every node the
    same host, node i listens on base + i for peers and clients:
    ``base_client_port`` defaults to base_peer_port + 100 (17100), or to
    base_peer_port + n rounded up to a hundred when n > 100, so that the two
    port ranges never overlap. When it gives each node its own host, every node
    uses ``peer_port`` and ``client_port`` (17001, 17101). Nodes listen on
    ``listen_interface``, by default ``default_interface(host)``.

    With ``web`` (or a ``web_port``) each node also gets ``web_listen``, its HTTP
    site: on one host at the client ports' base + 100 + i (17200 + i), with a host
    per node at ``web_port`` (default 17201).
    """
    hosts = host_names(host, n)
    shared = len(set(hosts)) == 1 and n > 1
    if shared and (peer_port is not None or client_port is not None):
        raise ValueError(
            "with one host for every node, node i listens on --base-port + i;"
            " --peer-port and --client-port need a --host-template with {id} or {index}"
        )
    ports: list[tuple[int, int]]
    web = web or web_port is not None
    web_ports: list[int] = []
    if shared or (n == 1 and peer_port is None and client_port is None):
        if base_client_port is None:
            base_client_port = base_peer_port + 100 * max(1, math.ceil(n / 100))
        top = max(base_peer_port, base_client_port) + n
        if web:
            if web_port is not None:
                raise ValueError("with one host for every node, node i's web port is derived")
            base_web = max(base_peer_port, base_client_port) + 100 * max(1, math.ceil(n / 100))
            web_ports = [base_web + i for i in range(1, n + 1)]
            top = base_web + n
        if min(base_peer_port, base_client_port) < 0 or top > 65535:
            raise ValueError(
                f"ports {base_peer_port + 1}.. and {base_client_port + 1}.. for {n} nodes"
                " do not fit in 1..65535"
            )
        ports = [(base_peer_port + i, base_client_port + i) for i in range(1, n + 1)]
    else:
        peer = PEER_PORT if peer_port is None else peer_port
        client = CLIENT_PORT if client_port is None else client_port
        if peer == client:
            raise ValueError(f"--peer-port and --client-port are both {peer}")
        ports = [(peer, client)] * n
        if web:
            web_port = WEB_PORT if web_port is None else web_port
            if web_port in (peer, client):
                raise ValueError(f"the web port {web_port} is also the peer or client port")
            web_ports = [web_port] * n
    adj: dict[int, list[int]] = {i: [] for i in range(1, n + 1)}
    for a, b in generate_graph(n, DEGREE, seed):
        adj[a].append(b)
        adj[b].append(a)
    nodes: list[dict[str, Any]] = []
    for i, nbs in adj.items():
        node_host = hosts[i - 1]
        peer, client = ports[i - 1]
        node: dict[str, Any] = {
            "id": i,
            "host": node_host,
            "peer_port": peer,
            "client_port": client,
        }
        interface = default_interface(node_host) if listen_interface is None else listen_interface
        if interface != node_host:
            node["peer_listen"] = listen_description(interface, peer)
            node["client_listen"] = listen_description(interface, client)
        if web_ports:
            node["web_listen"] = listen_description(interface, web_ports[i - 1])
        node["neighbours"] = sorted(nbs)
        nodes.append(node)
    return config_from_dict({"cluster": {"name": name}, "node": nodes}, "<generated>")


def summary(config: ClusterConfig) -> str:
    """``16 nodes, degree 3, diameter 3, mean path 2.20``."""
    degrees = sorted({len(spec.neighbours) for spec in config.nodes.values()})
    degree = str(degrees[0]) if len(degrees) == 1 else f"{degrees[0]}-{degrees[-1]}"
    diam, mean = _distances(config.edges())
    return f"{len(config.nodes)} nodes, degree {degree}, diameter {diam}, mean path {mean:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="gossip-config",
        description="Write a gossip cluster file with a low-diameter degree-3 graph, or check one.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--nodes", type=whole(low=1), metavar="N", help="number of nodes")
    mode.add_argument("--check", metavar="FILE", help="validate FILE and print its summary")
    mode.add_argument(
        "--settings-markdown",
        action="store_true",
        help="print the configuration reference (the README's tables) and exit",
    )
    parser.add_argument("--seed", type=whole(), default=0, help="random seed (default 0)")
    parser.add_argument(
        "--host-template",
        "--host",
        default=LOOPBACK,
        metavar="TEMPLATE",
        help="host of each node; {id} is its id, {index} is id - 1, e.g."
        f" 'gossip-{{index}}.gossip.default.svc.cluster.local' (default {LOOPBACK})",
    )
    parser.add_argument(
        "--listen-interface",
        metavar="ADDR",
        help="interface nodes listen on (default: the host itself when it is an IP"
        " literal, else 0.0.0.0)",
    )
    parser.add_argument(
        "--peer-port",
        type=whole(1, 65535),
        metavar="P",
        help=f"with a host per node: every node's peer port (default {PEER_PORT})",
    )
    parser.add_argument(
        "--client-port",
        type=whole(1, 65535),
        metavar="P",
        help=f"with a host per node: every node's client port (default {CLIENT_PORT})",
    )
    parser.add_argument(
        "--base-port",
        type=whole(0, 65535),
        default=BASE_PORT,
        metavar="P",
        help=f"with one host for all: node i listens for peers on P + i (default {BASE_PORT})",
    )
    parser.add_argument(
        "--web",
        action="store_true",
        help="give every node an HTTP site (web_listen: /metrics): at 17200 + id on one"
        f" host, else at --web-port (default {WEB_PORT})",
    )
    parser.add_argument(
        "--web-port",
        type=whole(1, 65535),
        metavar="P",
        help="with a host per node: every node's web port (implies --web)",
    )
    parser.add_argument("--name", default="local", help="cluster name (default local)")
    parser.add_argument("-o", "--output", metavar="FILE", help="write here, not to stdout")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2

    if args.settings_markdown:
        sys.stdout.write(settings_markdown() + "\n")
        return 0
    if args.check is not None:
        try:
            config = load_config(args.check)
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 1
        print(f"{args.check}: ok: {summary(config)}")
        return 0

    try:
        config = generate_config(
            args.nodes,
            name=args.name,
            host=args.host_template,
            base_peer_port=args.base_port,
            seed=args.seed,
            peer_port=args.peer_port,
            client_port=args.client_port,
            listen_interface=args.listen_interface,
            web=args.web,
            web_port=args.web_port,
        )
    except (ValueError, ConfigError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    text = dump_config(config)
    if args.output is None:
        sys.stdout.write(text)
    else:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            print(f"{args.output}: cannot write: {e.strerror or e}", file=sys.stderr)
            return 1
    print(summary(config), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
