// The gossip dashboard: draws what the serving node's event stream says.
// No framework and no build step: plain DOM and SVG. Text from the cluster
// (message bodies, errors) is only ever set as textContent.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const CENTER = 320;
const RADIUS = 250;
const NODE_RADIUS = 24;

const state = {
  cluster: null, // last "cluster" event
  trace: null, // last "trace" event
  traceId: null, // what the user chose to follow
  source: null, // the EventSource
  positions: new Map(), // node id -> {x, y}
};

function el(tag, attrs, parent) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

// Nodes on a circle, in id order (the generated graphs are near-regular, so a
// circle shows every link without a force simulation).
function layout(nodes) {
  const ids = nodes.map((n) => n.id);
  const key = ids.join(",");
  if (state.layoutKey === key) return;
  state.layoutKey = key;
  state.positions.clear();
  ids.forEach((id, i) => {
    const a = (2 * Math.PI * i) / ids.length - Math.PI / 2;
    state.positions.set(id, { x: CENTER + RADIUS * Math.cos(a), y: CENTER + RADIUS * Math.sin(a) });
  });
  buildGraph(nodes);
}

function buildGraph(nodes) {
  const links = document.getElementById("links");
  const group = document.getElementById("nodes");
  links.replaceChildren();
  group.replaceChildren();
  for (const n of nodes) {
    const p = state.positions.get(n.id);
    const g = el("g", { class: "node", "data-node": n.id, transform: `translate(${p.x},${p.y})` }, group);
    el("circle", { r: NODE_RADIUS }, g);
    el("text", { class: "label", y: -2 }, g).textContent = n.id;
    el("text", { class: "count", y: 12 }, g);
    const out = { x: (p.x - CENTER) / RADIUS, y: (p.y - CENTER) / RADIUS };
    el("text", { class: "arrival", x: out.x * 46, y: out.y * 46 + 4 }, g);
    el("title", {}, g);
  }
  const select = document.getElementById("submit-node");
  const chosen = select.value;
  select.replaceChildren();
  for (const n of nodes) {
    const option = document.createElement("option");
    option.value = n.id;
    option.textContent = n.id;
    select.appendChild(option);
  }
  select.value = chosen || String(state.cluster.served_by ?? nodes[0].id);
}

function linkKey(a, b) {
  return a < b ? `${a}-${b}` : `${b}-${a}`;
}

function drawCluster() {
  const c = state.cluster;
  if (!c) return;
  document.getElementById("cluster-name").textContent = c.cluster;
  document.getElementById("served-by").textContent =
    c.served_by == null ? "" : `served by node ${c.served_by}`;
  layout(c.nodes);
  const links = document.getElementById("links");
  const existing = new Map([...links.children].map((l) => [l.dataset.key, l]));
  for (const link of c.links) {
    const key = linkKey(link.a, link.b);
    let line = existing.get(key);
    if (!line) {
      const a = state.positions.get(link.a);
      const b = state.positions.get(link.b);
      line = el("line", { class: "link", x1: a.x, y1: a.y, x2: b.x, y2: b.y }, links);
      line.dataset.key = key;
      line.dataset.a = link.a;
      line.dataset.b = link.b;
      el("title", {}, line);
    }
    line.dataset.state = link.state;
    line.querySelector("title").textContent = `${link.a} – ${link.b}: ${link.state}`;
  }
  for (const n of c.nodes) {
    const g = document.querySelector(`#nodes .node[data-node="${n.id}"]`);
    g.dataset.state = n.state;
    g.querySelector(".count").textContent = n.message_count == null ? "–" : n.message_count;
    g.querySelector("title").textContent =
      `node ${n.id}: ${n.state}` + (n.error ? ` (${n.error})` : "");
  }
  drawTrace();
  drawTable();
}

function arrivals() {
  const t = state.trace;
  if (!t || !state.traceId) return null;
  return t.nodes; // id -> {received_at, path}
}

// Colour by arrival order: the origin darkest, the last node lightest.
function arrivalColour(rank, count) {
  const f = count > 1 ? rank / (count - 1) : 0;
  const light = 28 + f * 52;
  return `hsl(213, 70%, ${light}%)`;
}

function drawTrace() {
  const hops = document.getElementById("hops");
  hops.replaceChildren();
  const got = arrivals();
  const t = state.trace;
  const order = got
    ? Object.entries(got).sort((x, y) => x[1].received_at - y[1].received_at).map((e) => e[0])
    : [];
  for (const g of document.querySelectorAll("#nodes .node")) {
    const id = g.dataset.node;
    const circle = g.querySelector("circle");
    const arrival = g.querySelector(".arrival");
    const rank = order.indexOf(id);
    if (got && rank >= 0) {
      const rec = got[id];
      const dark = rank / Math.max(order.length - 1, 1) < 0.55;
      g.dataset.hasMessage = "true";
      g.dataset.origin = rec.path.length === 0 ? "true" : "false";
      circle.style.fill = arrivalColour(rank, order.length);
      g.querySelector(".label").style.fill = dark ? "#fff" : "";
      g.querySelector(".count").style.fill = dark ? "#dde" : "";
      arrival.textContent = `+${((rec.received_at - t.first_at) * 1000).toFixed(0)} ms`;
      if (rec.path.length > 0) {
        const from = state.positions.get(rec.path[rec.path.length - 1]);
        const to = state.positions.get(Number(id));
        if (from && to) {
          // Shorten the arrow so it ends at the circle's edge.
          const dx = to.x - from.x;
          const dy = to.y - from.y;
          const len = Math.hypot(dx, dy) || 1;
          const k1 = NODE_RADIUS / len;
          const k2 = (len - NODE_RADIUS - 3) / len;
          el("line", {
            class: "hop",
            x1: from.x + dx * k1, y1: from.y + dy * k1,
            x2: from.x + dx * k2, y2: from.y + dy * k2,
            "data-from": rec.path[rec.path.length - 1], "data-to": id,
          }, hops);
        }
      }
    } else {
      g.dataset.hasMessage = "false";
      g.dataset.origin = "false";
      circle.style.fill = "";
      g.querySelector(".label").style.fill = "";
      g.querySelector(".count").style.fill = "";
      arrival.textContent = "";
    }
  }
  const summary = document.getElementById("trace-summary");
  if (!state.traceId) {
    summary.textContent = "no message chosen";
  } else if (!t) {
    summary.textContent = `looking for ${state.traceId}…`;
  } else if (t.error) {
    summary.textContent = t.error;
  } else if (!t.id) {
    summary.textContent = `no node holds ${t.query} yet`;
  } else {
    const times = Object.values(t.nodes).map((r) => r.received_at);
    const spread = ((Math.max(...times) - t.first_at) * 1000).toFixed(0);
    const unknown = t.unknown.length
      ? ` (not known for node${t.unknown.length > 1 ? "s" : ""} ${t.unknown.join(", ")}: down)`
      : "";
    summary.textContent =
      `"${t.body.slice(0, 40)}" (${t.id.slice(0, 10)}): reached ${t.reached}/${t.total} nodes, ` +
      `last ${spread} ms after the first${unknown}`;
  }
  summary.dataset.reached = t && state.traceId ? t.reached : 0;
}

function drawTable() {
  const c = state.cluster;
  const got = arrivals();
  const tbody = document.querySelector("#node-table tbody");
  const rows = new Map([...tbody.children].map((r) => [r.dataset.node, r]));
  for (const n of c.nodes) {
    let row = rows.get(String(n.id));
    if (!row) {
      row = document.createElement("tr");
      row.dataset.node = n.id;
      for (let i = 0; i < 7; i++) row.appendChild(document.createElement("td"));
      tbody.appendChild(row);
    }
    row.dataset.state = n.state;
    const rec = got ? got[String(n.id)] : null;
    const cells = [
      n.id,
      n.state,
      n.message_count ?? "–",
      n.rate == null ? "–" : n.rate.toFixed(1),
      rec ? `+${((rec.received_at - state.trace.first_at) * 1000).toFixed(0)} ms` : "",
      rec ? rec.path.length : "",
      rec ? (rec.path.length ? rec.path.join(" → ") : "origin") : "",
    ];
    cells.forEach((v, i) => {
      row.children[i].textContent = v;
    });
    row.title = n.error || "";
  }
}

function connect() {
  if (state.source) state.source.close();
  const url = state.traceId ? `events?trace=${encodeURIComponent(state.traceId)}` : "events";
  const source = new EventSource(url);
  state.source = source;
  const conn = document.getElementById("connection");
  source.onopen = () => {
    conn.dataset.state = "open";
    conn.textContent = "live";
  };
  source.onerror = () => {
    conn.dataset.state = "lost";
    conn.textContent = "connection lost: retrying";
  };
  source.addEventListener("cluster", (e) => {
    state.cluster = JSON.parse(e.data);
    drawCluster();
  });
  source.addEventListener("trace", (e) => {
    state.trace = JSON.parse(e.data);
    drawCluster();
  });
}

function follow(id) {
  state.traceId = id || null;
  state.trace = null;
  document.getElementById("trace-id").value = id || "";
  if (state.traceId) history.replaceState(null, "", `#trace=${encodeURIComponent(id)}`);
  drawCluster();
  connect();
}

async function submit(event) {
  event.preventDefault();
  const result = document.getElementById("submit-result");
  const body = document.getElementById("message").value;
  const node = Number(document.getElementById("submit-node").value);
  result.textContent = "submitting…";
  result.dataset.ok = "";
  try {
    const response = await fetch("api/submit", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ body, node }),
    });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || response.statusText);
    result.dataset.ok = "true";
    result.dataset.id = answer.id;
    result.textContent = `stored on node ${answer.node} as ${answer.id}`;
    follow(answer.id);
  } catch (e) {
    result.dataset.ok = "false";
    result.textContent = `not submitted: ${e.message}`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("submit-form").addEventListener("submit", submit);
  document.getElementById("trace-form").addEventListener("submit", (e) => {
    e.preventDefault();
    follow(document.getElementById("trace-id").value.trim());
  });
  const m = location.hash.match(/trace=([^&]+)/);
  follow(m ? decodeURIComponent(m[1]) : null);
});
