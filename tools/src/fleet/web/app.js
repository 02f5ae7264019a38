// The fleet page of `kiln serve`: reads the admin JSON API (docs/FLEET_API.md) and draws
// rollouts (with their waves and gate figures), registered versions and devices.
// Every text from the server goes into the page through text nodes (never as HTML).
"use strict";

const TOKEN_KEY = "kiln-admin-token";
const DETAILED_ROLLOUTS = 10; // the newest ones get their waves and gates fetched
const REFRESH_MS = 5000;

const $ = (id) => document.getElementById(id);
let timer = null;
let busy = false;

// An element with attributes and children; strings become text nodes.
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) e.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === undefined || c === null) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function table(headers, rows) {
  const head = el("tr", {}, ...headers.map((h) => el("th", {}, h)));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows));
}

function td(text, cls) {
  return el("td", cls ? { class: cls } : {}, text);
}

function num(v, digits) {
  if (v === undefined || v === null || Number.isNaN(v)) return "-";
  return typeof v === "number" ? v.toFixed(digits) : String(v);
}

function stateCell(state) {
  return el("td", { class: "state state-" + String(state).replace(/[^a-z_]/g, "") }, state);
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

// Takes `#token=…` from the address into sessionStorage and clears it from the address bar.
function tokenFromHash() {
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (!m) return;
  try {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
  } catch (_) {
    sessionStorage.setItem(TOKEN_KEY, m[1]);
  }
  history.replaceState(null, "", location.pathname + location.search);
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path) {
  const resp = await fetch(path, {
    headers: { Authorization: "Bearer " + token() },
    cache: "no-store",
  });
  const text = await resp.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch (_) {
    body = null;
  }
  if (!resp.ok) {
    const msg = body && typeof body.error === "string" ? body.error : text.trim();
    throw new ApiError(resp.status, path + ": " + resp.status + " " + msg);
  }
  if (body === null) throw new ApiError(resp.status, path + ": the answer is not JSON");
  return body;
}

function setStatus(text, isError) {
  const s = $("status");
  s.textContent = text;
  s.className = isError ? "error" : "muted";
}

function showLogin(message) {
  $("fleet").hidden = true;
  $("login").hidden = false;
  if (message) setStatus(message, true);
  else setStatus("Enter the admin token (kiln serve --admin-token).", false);
  $("token").focus();
}

function gateCell(g) {
  if (g.passed === true) return el("td", { class: "gate-pass" }, "pass");
  if (g.passed === false) return el("td", { class: "gate-fail" }, "FAIL");
  return td("-");
}

function renderWaves(st) {
  const rows = st.waves.map((w) => {
    const g = w.gate || {};
    return el(
      "tr",
      { "data-wave": w.index + 1 },
      td(w.index + 1, "num"),
      td(w.pct + "%", "num"),
      stateCell(w.state),
      td(g.devices, "num"),
      td(g.reported, "num"),
      td(g.failures, "num"),
      td(num(g.failure_pct, 1), "num"),
      td(num(g.error_rate, 4), "num"),
      td(num(g.latency_p50_us, 0), "num"),
      td(num(g.previous_latency_p50_us, 0), "num"),
      td(num(g.latency_regression_pct, 1), "num"),
      td(num(g.psi, 3), "num"),
      gateCell(g),
      td(g.reason || ""),
    );
  });
  return table(
    ["wave", "devices %", "state", "devices", "reported", "failures", "failure %", "error rate",
      "p50 µs", "previous p50 µs", "latency +%", "PSI", "gate", "reason"],
    rows,
  );
}

function renderRollout(r, st) {
  const from = r.previous === null || r.previous === undefined ? "" : " (from v" + r.previous + ")";
  const head = el(
    "h3",
    {},
    (r.kind === "rollback" ? "rollback " : "rollout ") + r.id + ": ",
    el("span", { class: "mono" }, r.target.model + " v" + r.target.version),
    from + " — ",
    el("span", { class: "state state-" + r.state, "data-state": r.state }, r.state),
  );
  const facts = [
    "cohort: " + (r.cohort === null || r.cohort === undefined ? "every device" : r.cohort),
    "waves: " + r.waves.join(", ") + " %",
    "current wave: " + (Math.min(r.wave, r.waves.length - 1) + 1) + " of " + r.waves.length,
    "created " + r.created_at,
  ];
  const box = el("div", { class: "rollout", id: "rollout-" + r.id }, head, el("p", { class: "muted" }, facts.join(" · ")));
  if (r.reason) box.append(el("p", { class: "state-aborted" }, "reason: " + r.reason));
  if (st) {
    const counts = Object.entries(st.devices || {}).map(([v, n]) => "v" + v + ": " + n);
    box.append(el("p", {}, "devices by version: " + (counts.length ? counts.join(", ") : "none yet")));
    box.append(renderWaves(st));
  }
  return box;
}

function renderModels(models) {
  if (!models.length) return el("p", { class: "muted" }, "No version is registered yet (kiln push).");
  const rows = models.map((m) =>
    el(
      "tr",
      {},
      td(m.model.model, "mono"),
      td("v" + m.model.version, "num"),
      td(m.security_counter, "num"),
      td(m.size, "num"),
      el("td", { class: "mono", title: m.sha256 }, m.sha256.slice(0, 16)),
      td((m.signed_by || []).join(", "), "mono"),
      td(m.pushed_by + ", " + m.pushed_at),
      el("td", {}, el("details", {}, el("summary", {}, "lineage"), el("pre", {}, JSON.stringify(m.lineage, null, 2)))),
    ),
  );
  return table(["model", "version", "counter", "bytes", "sha256", "signed by", "pushed", "lineage"], rows);
}

function renderDevices(devices) {
  if (!devices.length) return el("p", { class: "muted" }, "No device has enrolled yet.");
  const rows = devices.map((d) =>
    el(
      "tr",
      { "data-device": d.device_id },
      td(d.device_id, "mono"),
      td(d.name),
      td(d.board),
      td(d.cohort),
      td(d.running ? d.running.model + " v" + d.running.version : "-", "mono"),
      td(d.last_seen || "-"),
      td(d.last_event || "-"),
    ),
  );
  return table(["device", "name", "board", "cohort", "running", "last seen", "last event"], rows);
}

async function load() {
  if (busy) return;
  busy = true;
  try {
    const [rollouts, models, devices] = await Promise.all([
      api("/api/v1/rollouts"),
      api("/api/v1/models"),
      api("/api/v1/devices"),
    ]);
    const detailed = await Promise.all(
      rollouts.slice(0, DETAILED_ROLLOUTS).map((r) => api("/api/v1/rollouts/" + encodeURIComponent(r.id))),
    );
    // Everything is built first, then swapped in, so the page never shows half a refresh.
    const rolloutsDiv = el("div", { id: "rollouts" });
    if (!rollouts.length) rolloutsDiv.append(el("p", { class: "muted" }, "No rollout yet (kiln push)."));
    rollouts.forEach((r, i) => rolloutsDiv.append(renderRollout(r, detailed[i])));
    $("rollouts").replaceWith(rolloutsDiv);
    $("models").replaceChildren(renderModels(models));
    $("devices").replaceChildren(renderDevices(devices));
    $("login").hidden = true;
    $("fleet").hidden = false;
    setStatus(
      rollouts.length + " rollouts, " + models.length + " versions, " + devices.length +
        " devices; updated " + new Date().toLocaleTimeString(),
      false,
    );
  } catch (e) {
    if (e instanceof ApiError && (e.status === 401 || e.status === 403)) {
      sessionStorage.removeItem(TOKEN_KEY);
      stopTimer();
      showLogin("The server refused the token: " + e.message);
    } else {
      setStatus("Cannot load the fleet: " + (e && e.message ? e.message : String(e)), true);
    }
  } finally {
    busy = false;
  }
}

function stopTimer() {
  if (timer !== null) clearInterval(timer);
  timer = null;
}

function startTimer() {
  stopTimer();
  if ($("auto").checked) timer = setInterval(() => { if (!document.hidden) load(); }, REFRESH_MS);
}

function start() {
  tokenFromHash();
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    $("token").value = "";
    setStatus("loading…", false);
    load().then(startTimer);
  });
  $("refresh").addEventListener("click", () => load());
  $("auto").addEventListener("change", startTimer);
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    stopTimer();
    showLogin("");
  });
  window.addEventListener("hashchange", () => {
    tokenFromHash();
    load();
  });
  if (!token()) {
    showLogin("");
    return;
  }
  load().then(startTimer);
}

start();
