"""The node's HTTP site (``web_listen``): ``/metrics`` for Prometheus, ``/dashboard/``.

``build_site(node, reactor)`` returns a ``twisted.web.server.Site`` whose root
resource has the child ``metrics``. Others mount their pages on the same
root, before the site starts listening or while it runs::

    site = build_site(node, reactor)
    site.resource.putChild(b"dashboard", DashboardResource(node))

``gossip.tap.node_services`` serves it as the service named "web" (only when
the node's ``web_listen`` is set); that service's ``factory`` is the site, so
``top.getServiceNamed("web").factory.resource.putChild(...)`` works there.

Why not ``prometheus_client.twisted.MetricsResource``: it runs the collectors
in the reactor's thread pool, and ``NodeCollector`` reads node state that the
reactor thread changes (dicts of counters, the link table) without locks. So
``MetricsPage`` renders ``generate_latest`` in the reactor thread; a scrape
costs O(neighbours x frame kinds), well under a millisecond. It also avoids
``prometheus_client.twisted``'s import of the global reactor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from gossip.web.metrics import node_registry

if TYPE_CHECKING:
    from gossip.node import GossipNode


class MetricsPage(Resource):
    """The Prometheus text exposition of one registry, rendered in the reactor thread."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)


class Index(Resource):
    """``/``: a plain list of what the site serves (its children), for people and probes."""

    def __init__(self, node_id: int) -> None:
        super().__init__()
        self.node_id = node_id

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        child: Resource = super().getChild(path, request)
        return child

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        if b"dashboard" in self.children:
            # Browsers go to the dashboard; the listing stays the body, for curl and probes.
            request.setResponseCode(302)
            request.setHeader(b"Location", b"dashboard/")
        names = sorted(name.decode("ascii", "replace") for name in self.children if name)
        lines = [f"gossip node {self.node_id}", *(f"/{name}" for name in names)]
        return ("\n".join(lines) + "\n").encode()


class QuietSite(Site):
    """A ``Site`` without an access log: a scrape every few seconds would fill the
    node's log with lines that carry none of its structured keys."""

    def log(self, request: Any) -> None:
        pass


def build_site(node: GossipNode, reactor: Any) -> Site:
    """The site of ``node``: ``/`` redirects to ``/dashboard/`` (the live dashboard of
    the whole cluster) with a list of the children as its body; ``/metrics`` is
    Prometheus's."""
    from gossip.web.dashboard import dashboard_resource

    root = Index(node.node_id)
    root.putChild(b"metrics", MetricsPage(node_registry(node)))
    root.putChild(b"dashboard", dashboard_resource(node, reactor))
    site = QuietSite(root, reactor=reactor)
    site.noisy = False
    site.displayTracebacks = False
    return site
