// chatd dashboard: polls /ui/api/overview and draws it. No framework, no build step.
// Every string from the server goes in as text (textContent / attributes), never as HTML:
// model names and callers are whatever a caller sent.
"use strict";

const TOKEN_KEY = "chatd.ui.token";
const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = ["#58a6ff", "#3fb950", "#d29922", "#bc8cff", "#ff7b72", "#39c5cf", "#e3b341", "#f778ba"];
const W = 600, H = 190, LEFT = 46, RIGHT = 10, TOP = 10, BOTTOM = 24;
let timer = null;
let tokenRequired = false;

function $(id) { return document.getElementById(id); }

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

function fmt(value, digits = 0) {
  if (value === null || value === undefined) return "–";
  return Number(value).toLocaleString(undefined, { maximumFractionDigits: digits });
}

function clock(epochSecs) {
  return new Date(epochSecs * 1000).toLocaleTimeString([], { hour12: false });
}

function setStatus(text, bad) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("bad", Boolean(bad));
}

// -- access ------------------------------------------------------------------------------

function showLogin(reason) {
  clearTimeout(timer);
  $("dashboard").hidden = true;
  $("login").hidden = false;
  if (reason) $("login-reason").textContent = reason;
  setStatus("admin token needed");
  $("token").focus();
}

function onLogin(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  $("login").hidden = true;
  poll();
}

async function start() {
  $("login-form").addEventListener("submit", onLogin);
  try {
    const answer = await fetch("/ui/api/access", { cache: "no-store" });
    tokenRequired = Boolean((await answer.json()).token_required);
  } catch (error) {
    setStatus("cannot reach chatd: " + error.message, true);
    timer = setTimeout(start, 3000);
    return;
  }
  if (tokenRequired && !sessionStorage.getItem(TOKEN_KEY)) showLogin();
  else poll();
}

// -- polling -----------------------------------------------------------------------------

async function poll() {
  clearTimeout(timer);
  let refresh = 2000;
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  try {
    const answer = await fetch("/ui/api/overview", { headers, cache: "no-store" });
    if (answer.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin("That token was refused: enter an admin token.");
      return;
    }
    if (!answer.ok) throw new Error("overview answered " + answer.status);
    const data = await answer.json();
    refresh = data.refresh_ms || refresh;
    render(data);
    let note = "worker pid " + data.worker.pid + " · updated " + clock(data.time) + " · every " + refresh / 1000 + " s";
    setStatus(note);
  } catch (error) {
    setStatus("cannot reach chatd (" + error.message + "); retrying", true);
  }
  timer = setTimeout(poll, refresh);
}

function render(data) {
  $("dashboard").hidden = false;
  const colors = {};
  data.providers.forEach((p, i) => { colors[p.name] = COLORS[i % COLORS.length]; });
  renderProviders(data);
  renderCharts(data.series, colors);
  renderSpend(data.spend);
  renderCallers(data.callers);
  renderErrors(data.errors);
  $("series-note").textContent = data.worker.multiprocess
    ? "· worker pid " + data.worker.pid + " only (one of several workers; /metrics has the totals)"
    : "";
}

// -- providers ---------------------------------------------------------------------------

function badge(state, extra) {
  const label = { ok: "ok", cooling_down: "cooling down", degraded: "degraded", no_key: "no key" }[state] || state;
  return el("span", { class: "badge " + state, text: extra ? label + " " + extra : label });
}

function renderProviders(data) {
  const rows = [];
  for (const p of data.providers) {
    const name = el("td", {}, p.name, el("span", { class: "kind", text: p.kind }));
    if (p.name === data.default) name.append(el("span", { class: "badge default", text: "default" }));
    rows.push(el("tr", { class: "provider", "data-provider": p.name, "data-state": p.state },
      name, el("td", {}, badge(p.state)), el("td"), el("td"), el("td"), el("td")));
    for (const e of p.endpoints || []) {
      const left = e.cooldown_remaining_secs ? Math.ceil(e.cooldown_remaining_secs) + " s" : "";
      rows.push(el("tr", { class: "endpoint", "data-provider": p.name, "data-endpoint": e.name, "data-state": e.state },
        el("td", {}, "↳ " + e.name, el("span", { class: "url", text: e.base_url || "" })),
        el("td", {}, badge(e.state, left)),
        el("td", { class: "num", text: fmt(e.in_flight) }),
        el("td", { class: "num", text: e.ewma_ms == null ? "–" : fmt(e.ewma_ms, 1) + " ms" }),
        el("td", { class: "num", text: fmt(e.requests) }),
        el("td", { class: "num", text: fmt(e.errors) })));
    }
  }
  document.querySelector("#providers tbody").replaceChildren(...rows);
}

// -- charts ------------------------------------------------------------------------------

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = Math.pow(10, Math.floor(Math.log10(value)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * power >= value) return m * power;
  return 10 * power;
}

// One chart: `lines` is [{values, color, provider, dashed}]; null values leave gaps.
function drawChart(node, times, lines, unit) {
  const max = niceMax(Math.max(0, ...lines.flatMap((l) => l.values.filter((v) => v !== null))));
  const x = (i) => LEFT + (i / Math.max(1, times.length - 1)) * (W - LEFT - RIGHT);
  const y = (v) => TOP + (1 - v / max) * (H - TOP - BOTTOM);
  const parts = [];
  for (let k = 0; k <= 4; k++) {
    const v = (max * k) / 4;
    parts.push(svg("line", { class: "grid", x1: LEFT, x2: W - RIGHT, y1: y(v), y2: y(v) }));
    const label = svg("text", { class: "axis", x: LEFT - 6, y: y(v) + 4, "text-anchor": "end" });
    label.textContent = fmt(v, max <= 10 ? 2 : max <= 100 ? 1 : 0) + unit;
    parts.push(label);
  }
  for (const i of [0, Math.floor(times.length / 3), Math.floor((2 * times.length) / 3), times.length - 1]) {
    if (times[i] === undefined) continue;
    const label = svg("text", { class: "axis", x: x(i), y: H - 6, "text-anchor": i === 0 ? "start" : i === times.length - 1 ? "end" : "middle" });
    label.textContent = clock(times[i]);
    parts.push(label);
  }
  let drawn = 0, nonzero = 0;
  for (const line of lines) {
    let segment = [];
    const flush = () => {
      if (segment.length === 1) {  // a lone point: a dot, so it shows
        const [px, py] = segment[0];
        parts.push(svg("circle", { class: "dot", cx: px, cy: py, r: 2.2, fill: line.color, "data-provider": line.provider }));
      } else if (segment.length > 1) {
        parts.push(svg("polyline", {
          class: "series" + (line.dashed ? " p95" : ""), stroke: line.color, "data-provider": line.provider,
          "data-points": segment.length, points: segment.map(([px, py]) => px.toFixed(1) + "," + py.toFixed(1)).join(" "),
        }));
      }
      segment = [];
    };
    line.values.forEach((v, i) => {
      if (v === null || v === undefined) { flush(); return; }
      segment.push([x(i), y(v)]);
      drawn++;
      if (v > 0) nonzero++;
    });
    flush();
  }
  node.replaceChildren(...parts);
  node.setAttribute("data-points", drawn);
  node.setAttribute("data-nonzero", nonzero);
}

// Show the window from its first traffic on (at least MIN_POINTS wide), not 15 empty minutes.
const MIN_POINTS = 24;

function trimmed(series) {
  const all = Object.values(series.providers);
  let first = series.times.findIndex((_, i) => all.some((s) => s.rate[i] > 0));
  if (first < 0) first = series.times.length;
  const from = Math.max(0, Math.min(first, series.times.length - MIN_POINTS));
  const cut = (values) => values.slice(from);
  const providers = {};
  for (const [name, s] of Object.entries(series.providers)) {
    providers[name] = { rate: cut(s.rate), error_rate: cut(s.error_rate), p50_ms: cut(s.p50_ms), p95_ms: cut(s.p95_ms) };
  }
  return { times: cut(series.times), providers };
}

function renderCharts(full, colors) {
  const series = trimmed(full);
  const active = Object.entries(series.providers).filter(([, s]) => s.rate.some((v) => v > 0));
  const legend = active.map(([name]) => {
    const swatch = svg("svg", { class: "swatch", width: 12, height: 4 });
    swatch.append(svg("rect", { width: 12, height: 4, fill: colors[name] }));
    return el("span", { "data-provider": name }, swatch, name);
  });
  $("legend").replaceChildren(...(legend.length ? legend : [el("span", { text: "no requests reached a provider in the last 15 minutes" })]));
  const line = (name, values, dashed) => ({ provider: name, values, color: colors[name], dashed });
  drawChart($("chart-rate"), series.times, active.map(([n, s]) => line(n, s.rate)), "");
  drawChart($("chart-latency"), series.times,
    active.flatMap(([n, s]) => [line(n, s.p50_ms), line(n, s.p95_ms, true)]), "");
  drawChart($("chart-errors"), series.times,
    active.map(([n, s]) => line(n, s.error_rate.map((v) => (v === null ? null : v * 100)))), "%");
}

// -- spend -------------------------------------------------------------------------------

function money(value) {
  return value === null || value === undefined ? "–" : "$" + Number(value).toFixed(value < 1 ? 4 : 2);
}

function renderSpend(spend) {
  const box = $("spend");
  if (spend === null || spend === undefined) {
    box.replaceChildren(el("p", { class: "empty", text: "No callers configured: spend per caller appears once callers and budgets are set." }));
    $("spend-period").textContent = "";
    return;
  }
  if (!spend.length) {
    box.replaceChildren(el("p", { class: "empty", text: "No spend recorded this period." }));
    return;
  }
  const periods = [...new Set(spend.map((r) => r.period).filter(Boolean))];
  $("spend-period").textContent = periods.length ? "· " + periods.join(", ") : "";
  box.replaceChildren(...spend.map((row) => {
    const bar = svg("svg", { class: "bar", viewBox: "0 0 100 12", preserveAspectRatio: "none" });
    bar.append(svg("rect", { class: "track", x: 0, y: 0, width: 100, height: 12, rx: 3 }));
    let share = null;
    if (row.budget_usd) {
      share = row.spend_usd / row.budget_usd;
      const fill = svg("rect", { class: "fill" + (share >= 1 ? " over" : share >= 0.8 ? " near" : ""), x: 0, y: 0, width: Math.min(100, share * 100).toFixed(2), height: 12, rx: 3 });
      bar.append(fill);
    }
    const figures = money(row.spend_usd) + (row.budget_usd ? " of " + money(row.budget_usd) + " (" + fmt(share * 100, 0) + "%)" : " · no budget");
    return el("div", { class: "spend-row", "data-caller": row.caller },
      el("span", { class: "caller", text: row.caller, title: row.caller }),
      bar,
      el("span", { class: "figures", text: figures }),
      el("span", { class: "tokens", text: fmt(row.input_tokens) + " tokens in · " + fmt(row.output_tokens) + " out" }));
  }));
}

// -- callers -----------------------------------------------------------------------------

function limit(value) {
  return value ? fmt(value) : "–";
}

function renderCallers(callers) {
  const rows = (callers || []).map((c) => el("tr", { class: "caller-" + c.state, "data-caller": c.name },
    el("td", { text: c.name + (c.admin ? " (admin)" : "") }),
    el("td", { text: c.source }),
    el("td", { text: c.state }),
    el("td", { text: c.models.join(", ") }),
    el("td", { class: "num", text: limit(c.rpm) }),
    el("td", { class: "num", text: limit(c.tpm) }),
    el("td", { class: "num", text: limit(c.max_concurrency) }),
    el("td", { text: c.budget_usd ? money(c.budget_usd) : "–" }),
    el("td", { text: money(c.spend_usd) }),
    el("td", { text: c.expires_at || "–" })));
  document.querySelector("#callers tbody").replaceChildren(...rows);
  $("callers-empty").hidden = rows.length > 0;
}

// -- errors ------------------------------------------------------------------------------

function renderErrors(errors) {
  const rows = errors.map((e) => el("tr", { title: "request " + (e.request_id || "?") + " · " + e.route },
    el("td", { text: clock(e.time) }),
    el("td", { class: "num", text: e.status }),
    el("td", { text: e.type || "" }),
    el("td", { text: e.caller || "–" }),
    el("td", { text: e.model || "–" }),
    el("td", { text: e.message || "" })));
  document.querySelector("#errors tbody").replaceChildren(...rows);
  $("errors-empty").hidden = rows.length > 0;
}

document.addEventListener("DOMContentLoaded", start);
