// changefeed console: log in, pick a stream, watch its events live, edit stream definitions.
// Plain JavaScript, no dependencies, loaded under a CSP without 'unsafe-inline'.
//
// Auth: POST /token with Basic credentials gives a bearer token, kept in sessionStorage
// (this tab only) and sent as `Authorization: Bearer` on REST calls and as `?access_token=`
// on stream URLs (EventSource cannot send headers). With "HttpOnly cookie", POST
// /token/cookie also sets the cookie and stream URLs carry no token. The password is not kept.
//
// Pause keeps the connection and keeps counting: events arriving while paused are held
// (the newest MAX_ROWS) and shown on resume, so nothing is missed and nothing reconnects.
// Reconnect closes and reopens with ?lastEventId=<last id>; EventSource's own reconnects
// send Last-Event-ID by themselves; a WebSocket the server closes (restart: 1001) is
// reopened here with backoff and ?lastEventId=<last _id>.
"use strict";

const MAX_ROWS = 500;
const SESSION_KEY = "changefeed.console";
const $ = (id) => document.getElementById(id);

const auth = { token: null, user: null, cookie: false, expires: 0 };
const conn = {
  kind: null, // "sse" | "ws"
  source: null, // EventSource or WebSocket
  path: null, // stream path + query without token or lastEventId
  srcMode: false, // ?src= given: that URL exactly, no login
  lastId: null, // text: SSE id / JSON of the WebSocket _id
  opened: false, // opened at least once (the next open is a reconnect)
  userClosed: false,
  retryTimer: null,
  failures: 0,
  paused: false,
  held: [],
};
const counts = { events: 0, resets: 0, errors: 0, reconnects: 0 };
let metaEtag = null;

// ---------------------------------------------------------------- small helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.dataset[k.slice(5)] = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function say(id, text, kind) {
  const node = $(id);
  node.textContent = text || "";
  node.classList.toggle("bad", kind === "bad");
  node.classList.toggle("good", kind === "good");
}

function b64(text) {
  // base64 of UTF-8 (btoa alone fails past Latin-1)
  const bytes = new TextEncoder().encode(text);
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin);
}

function jwtClaims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(part), (c) => c.charCodeAt(0))));
  } catch (e) {
    return {};
  }
}

async function api(method, path, body, extraHeaders) {
  const headers = { Accept: "application/json", "No-Auth-Challenge": "true", ...(extraHeaders || {}) };
  if (auth.token) headers.Authorization = "Bearer " + auth.token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : typeof body === "string" ? body : JSON.stringify(body),
    credentials: "same-origin",
    cache: "no-store",
  });
  let data = null;
  try {
    data = await response.json();
  } catch (e) {
    data = null;
  }
  return { ok: response.ok, status: response.status, data, headers: response.headers };
}

function problem(r) {
  const message = r.data && r.data.message ? r.data.message : "";
  return `${r.status}${message ? ": " + message : ""}`;
}

// ---------------------------------------------------------------- login

function saveSession() {
  if (auth.token) sessionStorage.setItem(SESSION_KEY, JSON.stringify(auth));
  else sessionStorage.removeItem(SESSION_KEY);
}

function showAuth() {
  const inside = !!auth.token;
  $("login-form").hidden = inside;
  $("whoami").hidden = !inside;
  $("user").textContent = auth.user || "";
  const left = Math.max(0, Math.round((auth.expires - Date.now()) / 60000));
  $("auth-mode").textContent = inside ? `(${auth.cookie ? "cookie" : "token"}, ${left} min left)` : "";
}

async function login(event) {
  event.preventDefault();
  const user = $("login-user").value;
  const password = $("login-password").value;
  const basic = { Authorization: "Basic " + b64(`${user}:${password}`), "No-Auth-Challenge": "true" };
  say("login-message", "logging in…");
  try {
    const r = await fetch("/token", { method: "POST", headers: basic, credentials: "same-origin" });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) return say("login-message", `login failed: ${r.status} ${data.message || ""}`, "bad");
    auth.cookie = $("login-cookie").checked;
    if (auth.cookie) {
      const c = await fetch("/token/cookie", { method: "POST", headers: basic, credentials: "same-origin" });
      if (!c.ok) return say("login-message", `cookie refused: ${c.status}`, "bad");
    }
    auth.token = data.access_token;
    auth.user = jwtClaims(auth.token).sub || user;
    auth.expires = Date.now() + 1000 * (data.expires_in || 0);
    $("login-password").value = "";
    saveSession();
    showAuth();
    say("login-message", "");
    await loadCollections();
  } catch (e) {
    say("login-message", `login failed: ${e}`, "bad");
  }
}

async function logout() {
  if (auth.cookie) await api("DELETE", "/token/cookie").catch(() => null);
  disconnect("logged out");
  Object.assign(auth, { token: null, user: null, cookie: false, expires: 0 });
  saveSession();
  showAuth();
  $("collection").replaceChildren();
  $("stream").replaceChildren();
  say("collections-message", "log in to list collections");
}

// ---------------------------------------------------------------- collections, streams, variables

function coll() {
  return $("collection").value;
}

async function loadCollections(select) {
  const r = await api("GET", "/");
  if (!r.ok) return say("collections-message", `collections: ${problem(r)}`, "bad");
  const names = (r.data || []).filter((n) => n !== "users" && n !== "acl").sort();
  names.push(...(r.data || []).filter((n) => n === "users" || n === "acl"));
  const keep = select || coll();
  $("collection").replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
  if (keep && names.includes(keep)) $("collection").value = keep;
  say("collections-message", names.length ? "" : "no collections yet: create one below");
  await collectionChanged();
}

async function collectionChanged() {
  for (const n of document.querySelectorAll(".coll-name")) n.textContent = coll() || "the collection";
  await Promise.all([loadStreams(), loadDefinitions()]);
}

async function loadStreams(select) {
  const name = coll();
  if (!name) return $("stream").replaceChildren();
  const r = await api("GET", `/${encodeURIComponent(name)}/_streams`);
  if (!r.ok) {
    $("stream").replaceChildren();
    return say("collections-message", `streams: ${problem(r)}`, "bad");
  }
  const keep = select || $("stream").value;
  const uris = (r.data || []).map((s) => s.uri);
  $("stream").replaceChildren(...uris.map((u) => el("option", { value: u, text: u })));
  if (keep && uris.includes(keep)) $("stream").value = keep;
  if (!uris.length) say("collections-message", `'${name}' has no streams: define one below`);
  else say("collections-message", "");
}

function addVar(name, value) {
  const row = $("var-row").content.firstElementChild.cloneNode(true);
  row.querySelector(".var-name").value = name || "";
  row.querySelector(".var-value").value = value || "";
  row.querySelector(".remove").addEventListener("click", () => row.remove());
  $("vars").append(row);
  return row;
}

function avars() {
  // a value that is JSON is that JSON (5, true, {"$oid": ...}), anything else a string
  const out = {};
  for (const row of document.querySelectorAll("#vars .var")) {
    const name = row.querySelector(".var-name").value.trim();
    if (!name) continue;
    const raw = row.querySelector(".var-value").value;
    try {
      out[name] = JSON.parse(raw);
    } catch (e) {
      out[name] = raw;
    }
  }
  return out;
}

// ---------------------------------------------------------------- the connection

function setState(state, detail) {
  const node = $("state");
  node.dataset.state = state;
  node.textContent = state;
  $("state-detail").textContent = detail || "";
}

function bump(name) {
  counts[name] += 1;
  $("count-" + name).textContent = String(counts[name]);
}

function setButtons() {
  const live = !!conn.source || !!conn.retryTimer;
  $("disconnect-button").disabled = !live;
  $("pause-button").disabled = !live && !conn.paused;
  $("reconnect-button").disabled = !conn.path || (!conn.lastId && !conn.srcMode);
}

function streamUrl(withLastId) {
  // the URL to open: the path, the token unless a cookie carries it, the last id if asked
  let url = conn.path;
  const extra = [];
  if (!conn.srcMode && auth.token && !auth.cookie) extra.push("access_token=" + encodeURIComponent(auth.token));
  if (withLastId && conn.lastId) extra.push("lastEventId=" + encodeURIComponent(conn.lastId));
  if (extra.length) url += (url.includes("?") ? "&" : "?") + extra.join("&");
  if (conn.kind === "ws") {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    url = `${scheme}//${location.host}${url}`;
  }
  return url;
}

function connect(event) {
  if (event) event.preventDefault();
  const name = coll();
  const uri = $("stream").value;
  if (!name || !uri) return say("collections-message", "pick a collection and a stream first", "bad");
  const vars = avars();
  let path = `/${encodeURIComponent(name)}/_streams/${encodeURIComponent(uri)}?noauthchallenge`;
  if (Object.keys(vars).length) path += "&avars=" + encodeURIComponent(JSON.stringify(vars));
  closeSource();
  conn.srcMode = false;
  conn.kind = document.querySelector("input[name=transport]:checked").value;
  conn.path = path;
  conn.lastId = null;
  conn.opened = false;
  $("last-id").textContent = "–";
  open(false);
}

function reconnect() {
  // close, then open again from the last id: no event is lost or repeated
  if (!conn.path) return;
  closeSource();
  open(true);
}

function disconnect(why) {
  closeSource();
  if (conn.path) setState("closed", why || "disconnected");
  setButtons();
}

function closeSource() {
  conn.userClosed = true;
  clearTimeout(conn.retryTimer);
  conn.retryTimer = null;
  if (conn.source) conn.source.close();
  conn.source = null;
}

function open(fromLastId) {
  conn.userClosed = false;
  const url = streamUrl(fromLastId);
  $("url").textContent = url.replace(/access_token=[^&]*/, "access_token=…");
  setState(conn.opened ? "reconnecting" : "connecting", fromLastId && conn.lastId ? "from the last id" : "");
  if (conn.kind === "ws") openWebSocket(url);
  else openEventSource(url);
  setButtons();
}

function opened() {
  if (conn.opened) bump("reconnects");
  conn.opened = true;
  conn.failures = 0;
  setState("open", conn.kind === "ws" ? "WebSocket" : "SSE");
  setButtons();
}

function openEventSource(url) {
  const es = new EventSource(url, { withCredentials: true });
  conn.source = es;
  es.onopen = () => {
    if (conn.source === es) opened();
  };
  es.onerror = () => {
    if (conn.source !== es) return;
    bump("errors");
    if (es.readyState === EventSource.CLOSED) {
      // a non-200 answer: EventSource gives up for good. Ask the server why (HEAD runs the
      // same checks and opens nothing).
      conn.source = null;
      setState("closed", "the server refused the stream");
      explainRefusal(url);
      setButtons();
    } else {
      const state = $("state").dataset.state;
      setState("reconnecting", state === "ended" ? $("state-detail").textContent : "");
    }
  };
  for (const kind of ["change", "reset", "error", "end", "revoked", "expired"]) {
    es.addEventListener(kind, (e) => {
      // a failed connection fires a plain 'error' Event too: only the server's are MessageEvents
      if (conn.source !== es || !(e instanceof MessageEvent)) return;
      let data;
      try {
        data = JSON.parse(e.data);
      } catch (err) {
        data = { raw: e.data };
      }
      received(kind, data, e.lastEventId || null, e.data);
    });
  }
}

const REFUSALS = {
  400: "bad request (variables or last id?)",
  401: "not logged in, or the token expired",
  403: "not permitted",
  404: "no such collection or stream",
  429: "too many streams open",
  503: "server unavailable",
};

async function explainRefusal(url) {
  try {
    const r = await fetch(url, { method: "HEAD", headers: { Accept: "text/event-stream" }, credentials: "same-origin" });
    if (!r.ok) setState("closed", `HTTP ${r.status}: ${REFUSALS[r.status] || "refused"}`);
  } catch (e) {
    /* the state already says closed */
  }
}

function openWebSocket(url) {
  let ws;
  try {
    ws = new WebSocket(url);
  } catch (e) {
    setState("closed", String(e));
    return;
  }
  conn.source = ws;
  let wasOpen = false;
  ws.onopen = () => {
    wasOpen = true;
    if (conn.source === ws) opened();
  };
  ws.onmessage = (e) => {
    if (conn.source !== ws) return;
    let frame;
    try {
      frame = JSON.parse(e.data);
    } catch (err) {
      return received("error", { raw: e.data }, null, e.data);
    }
    const id = frame && frame._id !== undefined ? JSON.stringify(frame._id) : null;
    let kind = "change";
    if (frame && frame.operationType === undefined) {
      if (frame.resumeFrom !== undefined) kind = "reset";
      else if (frame.error !== undefined) kind = "error";
    }
    received(kind, frame, id, e.data);
  };
  ws.onclose = (e) => {
    if (conn.source !== ws) return;
    conn.source = null;
    if (conn.userClosed) return;
    const reason = `${e.code}${e.reason ? " " + e.reason : ""}`;
    if (conn.opened && e.code !== 1006) addRow("end", { code: e.code, reason: e.reason }, null, null);
    if (!wasOpen) {
      conn.failures += 1; // a refused handshake (401, 404 ...) closes with 1006 and no reason
      bump("errors");
    }
    // 1008: access withdrawn or token expired (but "fell behind" resumes); 1002/1007/1009: ours
    const fatal = [1002, 1007, 1009].includes(e.code) || (e.code === 1008 && !/fell behind/.test(e.reason));
    if (fatal || conn.failures >= 8) {
      setState("ended", fatal ? reason : `${reason}; gave up after ${conn.failures} failed attempts`);
      return setButtons();
    }
    const delay = Math.min(10000, 500 * 2 ** conn.failures);
    setState("ended", `${reason}; reconnecting in ${(delay / 1000).toFixed(1)} s`);
    conn.retryTimer = setTimeout(() => {
      conn.retryTimer = null;
      open(true);
    }, delay);
    setButtons();
  };
}

// ---------------------------------------------------------------- events

function wallTime(data) {
  const w = data && data.wallTime && data.wallTime.$date;
  if (w === undefined) return null;
  if (typeof w === "string") return Date.parse(w);
  if (typeof w === "number") return w;
  if (w && w.$numberLong) return Number(w.$numberLong);
  return null;
}

function received(kind, data, id, text) {
  if (id) {
    const first = !conn.lastId;
    conn.lastId = id;
    $("last-id").textContent = id;
    if (first) setButtons(); // "Reconnect from last id" has an id now
  }
  if (kind === "change") {
    bump("events");
    const at = wallTime(data);
    if (at !== null) $("lag").textContent = `${Math.max(0, Date.now() - at)} ms`;
    if ($("state").dataset.state === "reset") setState("open", conn.kind === "ws" ? "WebSocket" : "SSE");
  } else if (kind === "reset") {
    bump("resets");
    setState("reset", data.reason || "the resume point is gone; going on from now");
  } else if (kind === "error") {
    bump("errors");
  } else {
    // end (SSE), revoked, expired: the server ends the stream and says why
    const why = (data && (data.message || data.reason)) || kind;
    setState("ended", kind === "end" ? why : `${kind}: ${why}`);
    if (kind !== "end" && conn.source && conn.kind === "sse") {
      conn.source.close(); // a new token is needed: EventSource must not retry with this one
      conn.source = null;
      setButtons();
    }
  }
  addRow(kind, data, id, text);
}

function addRow(kind, data, id, text) {
  const row = { kind, data, id, text, at: new Date() };
  if (conn.paused) {
    conn.held.push(row);
    if (conn.held.length > MAX_ROWS) conn.held.shift();
    $("paused-count").textContent = String(conn.held.length);
    return;
  }
  render(row);
}

function fieldChip(cls, name, value) {
  const text = value === undefined ? name : `${name}: ${short(value)}`;
  return el("span", { class: `field ${cls}`, "data-field": name, text, title: text });
}

function short(value) {
  const s = JSON.stringify(value);
  return s && s.length > 60 ? s.slice(0, 57) + "…" : s;
}

function docKey(data) {
  const key = data && data.documentKey;
  if (!key) return "";
  const id = key._id;
  if (id && typeof id === "object" && id.$oid) return id.$oid;
  if (typeof id === "string") return id;
  return JSON.stringify(id !== undefined ? id : key);
}

function changes(kind, data) {
  const box = el("div", { class: "fields" });
  if (kind === "change") {
    const ud = data.updateDescription;
    if (ud) {
      // every write stamps _etag: left out of the chips (the JSON has it), as for inserts
      for (const [name, value] of Object.entries(ud.updatedFields || {})) {
        if (name !== "_etag") box.append(fieldChip("updated", name, value));
      }
      for (const name of ud.removedFields || []) box.append(fieldChip("removed", name));
      for (const t of ud.truncatedArrays || []) box.append(fieldChip("removed", `${t.field}[${t.newSize}…]`));
    } else if (data.operationType === "delete") {
      box.append(el("span", { class: "note", text: "document deleted" }));
    } else if (data.fullDocument) {
      const entries = Object.entries(data.fullDocument).filter(([k]) => k !== "_id" && k !== "_etag");
      for (const [name, value] of entries.slice(0, 6)) box.append(fieldChip("plain", name, value));
      if (entries.length > 6) box.append(el("span", { class: "note", text: `+${entries.length - 6} more` }));
    }
  } else if (kind === "reset") {
    box.append(el("span", { class: "note", text: data.reason || "history gone" }));
  } else if (kind === "error") {
    box.append(el("span", { class: "note", text: data.error || data.message || data.raw || "error" }));
  } else {
    const text = data.message || data.reason || (data.code ? `WebSocket closed ${data.code}` : kind);
    box.append(el("span", { class: "note", text }));
  }
  return box;
}

function render(row) {
  const { kind, data, id, text } = row;
  const op = kind === "change" ? String(data.operationType || "change") : kind;
  const json = el("pre", { class: "json", text: text ? pretty(text) : JSON.stringify(data, null, 2) });
  const tr = el(
    "tr",
    { class: `${kind} fresh`, "data-kind": kind, "data-op": op, "data-id": id || "" },
    el("td", { class: "time", text: row.at.toLocaleTimeString([], { hour12: false }) + "." + String(row.at.getMilliseconds()).padStart(3, "0") }),
    el("td", {}, el("span", { class: `op op-${op}`, text: op })),
    el("td", { class: "key", text: kind === "change" ? docKey(data) : "", title: kind === "change" ? docKey(data) : "" }),
    el("td", {}, changes(kind, data), el("details", { class: "json" }, el("summary", { text: "JSON" }), json)),
  );
  const body = $("events");
  body.prepend(tr); // newest first
  while (body.rows.length > MAX_ROWS) body.deleteRow(body.rows.length - 1);
  $("empty").hidden = true;
  setTimeout(() => tr.classList.remove("fresh"), 1300);
}

function pretty(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch (e) {
    return text;
  }
}

function togglePause() {
  conn.paused = !conn.paused;
  $("pause-button").setAttribute("aria-pressed", String(conn.paused));
  $("pause-button").textContent = conn.paused ? "Resume" : "Pause";
  $("paused-note").hidden = !conn.paused;
  if (!conn.paused) {
    const held = conn.held;
    conn.held = [];
    for (const row of held) render(row);
  }
  $("paused-count").textContent = "0";
}

function clearTable() {
  $("events").replaceChildren();
  conn.held = [];
  $("empty").hidden = false;
  for (const k of Object.keys(counts)) {
    counts[k] = 0;
    $("count-" + k).textContent = "0";
  }
  $("lag").textContent = "–";
}

// ---------------------------------------------------------------- definitions and inserts

async function loadDefinitions() {
  const name = coll();
  metaEtag = null;
  if (!name) {
    $("streams-json").value = "";
    return;
  }
  const r = await api("GET", `/${encodeURIComponent(name)}/_meta`);
  if (!r.ok) return say("editor-message", `definitions: ${problem(r)}`, "bad");
  metaEtag = r.headers.get("ETag");
  $("streams-json").value = JSON.stringify((r.data && r.data.streams) || [], null, 2);
  say("editor-message", "");
}

function editedStreams() {
  try {
    const value = JSON.parse($("streams-json").value);
    if (!Array.isArray(value)) throw new Error("streams must be a JSON array");
    return value;
  } catch (e) {
    say("editor-message", `not valid JSON: ${e.message}`, "bad");
    return null;
  }
}

async function writeDefinitions(dryRun) {
  // PATCH {"streams": ...}: the collection's other properties stay as they are
  const name = coll();
  if (!name) return say("editor-message", "pick a collection first", "bad");
  const streams = editedStreams();
  if (!streams) return false;
  const headers = metaEtag ? { "If-Match": metaEtag } : {};
  const path = `/${encodeURIComponent(name)}${dryRun ? "?dryRun=true" : ""}`;
  const r = await api("PATCH", path, { streams }, headers);
  if (!r.ok) {
    const hint = r.status === 409 ? " (changed elsewhere: Reload)" : "";
    say("editor-message", `${dryRun ? "invalid" : "not saved"}: ${problem(r)}${hint}`, "bad");
    return false;
  }
  if (dryRun) {
    say("editor-message", `valid: ${streams.length} stream${streams.length === 1 ? "" : "s"} (nothing saved yet)`, "good");
    return true;
  }
  metaEtag = r.headers.get("ETag") || metaEtag;
  say("editor-message", "saved (clients of a redefined stream reconnect)", "good");
  await loadStreams();
  return true;
}

async function save() {
  if (await writeDefinitions(true)) await writeDefinitions(false);
}

async function createCollection(event) {
  event.preventDefault();
  const name = $("create-name").value.trim();
  if (!name) return say("editor-message", "name the new collection", "bad");
  const exists = await api("GET", `/${encodeURIComponent(name)}/_meta`);
  if (exists.ok) {
    say("editor-message", `'${name}' exists already: selected`, "good");
  } else {
    const body = { streams: [{ uri: "all", stages: [] }] };
    const r = await api("PUT", `/${encodeURIComponent(name)}`, body);
    if (!r.ok) return say("editor-message", `not created: ${problem(r)}`, "bad");
    say("editor-message", `created '${name}' with the stream 'all'`, "good");
  }
  $("create-name").value = "";
  await loadCollections(name);
}

async function insertDocument() {
  const name = coll();
  if (!name) return say("insert-message", "pick a collection first", "bad");
  let doc;
  try {
    doc = JSON.parse($("insert-json").value);
  } catch (e) {
    return say("insert-message", `not valid JSON: ${e.message}`, "bad");
  }
  const r = await api("POST", `/${encodeURIComponent(name)}`, doc);
  if (!r.ok) return say("insert-message", `not inserted: ${problem(r)}`, "bad");
  const where = r.headers.get("Location") || "";
  say("insert-message", `inserted ${where}`, "good");
}

// ---------------------------------------------------------------- start

function start() {
  $("login-form").addEventListener("submit", login);
  $("logout-button").addEventListener("click", logout);
  $("collection").addEventListener("change", collectionChanged);
  $("refresh-button").addEventListener("click", () => loadCollections());
  $("add-var").addEventListener("click", () => addVar().querySelector(".var-name").focus());
  $("connect-form").addEventListener("submit", connect);
  $("disconnect-button").addEventListener("click", () => disconnect());
  $("pause-button").addEventListener("click", togglePause);
  $("reconnect-button").addEventListener("click", reconnect);
  $("clear-button").addEventListener("click", clearTable);
  $("validate-button").addEventListener("click", () => writeDefinitions(true));
  $("save-button").addEventListener("click", save);
  $("reload-defs-button").addEventListener("click", loadDefinitions);
  $("create-form").addEventListener("submit", createCollection);
  $("insert-button").addEventListener("click", insertDocument);

  try {
    Object.assign(auth, JSON.parse(sessionStorage.getItem(SESSION_KEY) || "{}"));
  } catch (e) {
    /* nothing kept */
  }
  if (auth.token && auth.expires <= Date.now()) Object.assign(auth, { token: null, user: null });
  showAuth();
  setInterval(showAuth, 30000);

  const src = new URLSearchParams(location.search).get("src");
  if (src && src.startsWith("/") && !src.startsWith("//")) {
    // /_demo?src=<stream url>: that URL as it is, over SSE, no login needed (a public stream)
    conn.srcMode = true;
    conn.kind = "sse";
    conn.path = src;
    open(false);
  }
  if (auth.token) loadCollections();
  else say("collections-message", "log in to list collections");
}

document.addEventListener("DOMContentLoaded", start);
