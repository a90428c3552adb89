"""The live dashboard: static page, JSON API and server-sent events, as one resource.

``dashboard_resource(node, reactor)`` is mounted as ``/dashboard/`` on the node's
web site. Under it:

- ``/`` the page (``static/index.html``; CSS and JavaScript beside it, shipped
  in the package: no build step, nothing fetched from elsewhere);
- ``api/cluster`` the cluster's picture as JSON (nodes, counts, rates, links);
- ``api/trace?id=ID`` where one message arrived, when, and through which path;
- ``api/submit`` (POST, JSON ``{"body": ..., "node": N}``) submits a message to
  node N (default: the serving node);
- ``events[?trace=ID]`` server-sent events: the picture after every poll
  (``event: cluster``) and, with ``trace``, that message's propagation
  (``event: trace``).

The page is served by any node and shows the whole cluster: the node asks
every node over AMP (``gossip.web.cluster_view``). At most ``MAX_VIEWERS``
event streams are open at once; a viewer whose connection stops taking data is
skipped (each event is the whole picture, so nothing is lost) and disconnected
after ``STALLED_VIEWER_SECONDS``. A submit must come as JSON from the page's own
origin, so another web site cannot post messages through a visitor's browser.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.web import pages, resource, server, static
from twisted.web.iweb import IRequest

from gossip import logs
from gossip.client.api import NodeClosedConnection, NodeUnreachable
from gossip.client.commands import BadRequest, MessageRejected, NodeBusy
from gossip.core.message import BadIdText
from gossip.web.cluster_view import ClusterView, LocalClient

_log = logs.logger()
STATIC_DIR = Path(__file__).parent / "static"
MAX_VIEWERS = 16
STALLED_VIEWER_SECONDS = 30.0
MAX_SUBMIT_REQUEST_BYTES = 256 * 1024  # JSON of the largest message, \u-escaped
SECURITY_HEADERS = {
    b"content-security-policy": b"default-src 'self'; img-src 'self' data:",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
}


def dashboard_resource(node: Any, reactor: Any) -> resource.Resource:
    """The dashboard of ``node``'s cluster, served by ``node`` (a ``GossipNode``)."""
    view = ClusterView(node.config, node.node_id, LocalClient(node), reactor)
    return Dashboard(view, reactor)


class Dashboard(resource.Resource):
    """``/dashboard``: redirects to ``/dashboard/``; the page and the API below it."""

    def __init__(self, view: ClusterView, clock: Any) -> None:
        super().__init__()
        self.view = view
        self.events = EventStream(view, clock)
        api = resource.Resource()
        api.putChild(b"cluster", ClusterJSON(view))
        api.putChild(b"trace", TraceJSON(view))
        api.putChild(b"submit", Submit(view))
        self.putChild(b"", static.File(str(STATIC_DIR / "index.html"), "text/html"))
        self.putChild(b"static", _no_listing(static.File(str(STATIC_DIR))))
        self.putChild(b"api", api)
        self.putChild(b"events", self.events)

    def getChildWithDefault(self, path: bytes, request: IRequest) -> resource.Resource:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        child: resource.Resource = super().getChildWithDefault(path, request)
        return child

    def render_GET(self, request: server.Request) -> bytes:
        # "/dashboard" without the slash: the page's relative links need it.
        last = request.prepath[-1] if request.prepath else b"dashboard"
        request.redirect(last + b"/")
        return b""


def _no_listing(files: static.File) -> static.File:
    files.indexNames = []
    files.directoryListing = lambda: pages.forbidden()  # type: ignore[method-assign]
    return files


def _json(request: server.Request, body: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode("utf-8")


def _error(request: server.Request, code: int, text: str) -> bytes:
    return _json(request, {"error": text}, code)


def _arg(request: server.Request, name: bytes) -> str | None:
    values = (request.args or {}).get(name)
    return values[0].decode("utf-8", "replace") if values else None


class ClusterJSON(resource.Resource):
    isLeaf = True

    def __init__(self, view: ClusterView) -> None:
        super().__init__()
        self.view = view

    def render_GET(self, request: server.Request) -> bytes:
        self.view.want()
        return _json(request, self.view.snapshot())


class TraceJSON(resource.Resource):
    isLeaf = True

    def __init__(self, view: ClusterView) -> None:
        super().__init__()
        self.view = view

    def render_GET(self, request: server.Request) -> bytes:
        query = _arg(request, b"id")
        if not query:
            return _error(request, 400, "give a message id: api/trace?id=ID")
        try:
            trace = self.view.follow(query)
        except BadIdText as e:
            return _error(request, 400, str(e))
        return _json(request, trace.as_json(self.view.nodes))


class Submit(resource.Resource):
    isLeaf = True

    def __init__(self, view: ClusterView) -> None:
        super().__init__()
        self.view = view

    def render_POST(self, request: server.Request) -> bytes | int:
        problem = _submit_problem(request)
        if problem is not None:
            return _error(request, *problem)
        try:
            content = request.content.read(MAX_SUBMIT_REQUEST_BYTES + 1) if request.content else b""
            form = json.loads(content or b"null")
            body, node = form["body"], form.get("node", self.view.local_id)
            if not isinstance(body, str) or not isinstance(node, int) or isinstance(node, bool):
                raise TypeError
        except (ValueError, TypeError, KeyError, AttributeError):
            return _error(request, 400, 'send JSON {"body": "text", "node": N}')
        if node not in self.view.nodes:
            return _error(request, 400, f"node {node} is not in this cluster")
        if not body:
            return _error(request, 400, "the message is empty")
        Deferred.fromCoroutine(self._submit(request, node, body))
        return server.NOT_DONE_YET

    async def _submit(self, request: server.Request, node: int, body: str) -> None:
        try:
            mid = await self.view.submit(node, body)
            answer = _json(request, {"id": mid, "node": node})
        except Exception as e:
            answer = _error(request, *_submit_failure(e, node))
        if not request.finished and not getattr(request, "_disconnected", False):
            request.write(answer)
            request.finish()


def _submit_problem(request: server.Request) -> tuple[int, str] | None:
    """Why this request may not submit, or None: JSON only (a cross-site form
    cannot send it without a preflight we never answer), from this origin only."""
    kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if kind != b"application/json":
        return 415, "send the message as application/json"
    origin = request.getHeader(b"origin")
    host = request.getHeader(b"host")
    if (
        origin is not None
        and host is not None
        and origin.split(b"://", 1)[-1].lower() != host.lower()
    ):
        return 403, "submits are accepted from the dashboard's own page only"
    length = request.getHeader(b"content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_SUBMIT_REQUEST_BYTES):
        return 413, f"a submit request is at most {MAX_SUBMIT_REQUEST_BYTES} bytes"
    return None


def _submit_failure(e: BaseException, node: int) -> tuple[int, str]:
    if isinstance(e, MessageRejected | BadRequest):
        return 422, str(e)
    if isinstance(e, NodeBusy):
        return 503, str(e)
    if isinstance(e, NodeUnreachable | NodeClosedConnection):
        return 502, str(e)
    if isinstance(e, TimeoutError):
        return 504, f"node {node} did not answer in time"
    _log.failure("dashboard submit to node {node} failed", node=node)
    return 500, f"submit to node {node} failed: {type(e).__name__}"


class Viewer:
    """One open event stream; a streaming producer so a full connection pauses it."""

    def __init__(self, request: server.Request, trace: str | None, clock: Any) -> None:
        self.request = request
        self.trace = trace
        self.clock = clock
        self.paused_since: float | None = None
        self.skipped = 0

    def pauseProducing(self) -> None:
        if self.paused_since is None:
            self.paused_since = self.clock.seconds()

    def resumeProducing(self) -> None:
        self.paused_since = None

    def stopProducing(self) -> None:
        self.paused_since = None

    def stalled(self) -> bool:
        return (
            self.paused_since is not None
            and self.clock.seconds() - self.paused_since > STALLED_VIEWER_SECONDS
        )

    def send(self, event: str, data: Any) -> None:
        self.request.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())


class EventStream(resource.Resource):
    """``events``: server-sent events, the cluster's picture after every poll."""

    isLeaf = True
    log = logs.logger()

    def __init__(self, view: ClusterView, clock: Any) -> None:
        super().__init__()
        self.view = view
        self.clock = clock
        self.viewers: list[Viewer] = []
        view.listeners.append(self.publish)

    def render_GET(self, request: server.Request) -> bytes | int:
        if len(self.viewers) >= MAX_VIEWERS:
            request.setResponseCode(503)
            request.setHeader(b"retry-after", b"10")
            return f"too many dashboard viewers (at most {MAX_VIEWERS})\n".encode()
        trace = _arg(request, b"trace") or None
        if trace is not None:
            try:
                self.view.follow(trace)
            except BadIdText as e:
                return _error(request, 400, str(e))
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-store")
        viewer = Viewer(request, trace, self.clock)
        self.viewers.append(viewer)
        request.registerProducer(viewer, True)
        request.notifyFinish().addBoth(self._gone, viewer)
        request.write(b"retry: 2000\n\n")
        self.view.want()
        self._send(viewer)
        return server.NOT_DONE_YET

    def _gone(self, _: object, viewer: Viewer) -> None:
        if viewer in self.viewers:
            self.viewers.remove(viewer)

    def publish(self) -> None:
        """Send the new picture to every viewer whose connection takes it."""
        if self.viewers:
            self.view.want()
        for viewer in list(self.viewers):
            if viewer.stalled():
                self.log.info("dashboard viewer stopped reading: disconnected")
                self._gone(None, viewer)
                transport: Any = viewer.request.channel.transport
                if transport is not None:
                    transport.abortConnection()
            elif viewer.paused_since is not None:
                viewer.skipped += 1
            else:
                self._send(viewer)

    def _send(self, viewer: Viewer) -> None:
        viewer.send("cluster", self.view.snapshot())
        if viewer.trace is not None:
            self.view.follow(viewer.trace)
            viewer.send("trace", self.view.trace_json(viewer.trace))
