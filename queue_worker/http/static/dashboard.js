"use strict";
// The dashboard: counters, throughput, queue backlog, controls, executors, tasks in flight,
// recent failures and the live tail (#/), and one task's page (#/task/<eval_id>).
const $ = (id) => document.getElementById(id);
const BUCKET_MS = 5000, BUCKETS = 60, MAX_LINES = 200, MAX_KEPT = 1000;
const TOKEN_KEY = "queue-worker-token";
const TASK_ROUTE = "#/task/";
let source = null, connecting = false, signedOut = false, lastId = null;
let perSecond = [];  // [{second, completed, failed}] from GET /throughput
const tail = [];  // the entries received, oldest first (at most MAX_KEPT)
let tailPaused = false, heldBack = 0;
const failureReasons = new Map();  // "<eval_id>:<since_ms>" -> reason text
let actions = null;  // which of POST /tasks/{eval_id}/cancel|retry this worker has

class Unauthorized extends Error {}

function text(tag, content, cls) {
  const el = document.createElement(tag);
  el.textContent = content;
  if (cls) el.className = cls;
  return el;
}

function taskLink(evalId) {
  const a = text("a", evalId, "eval");
  a.href = TASK_ROUTE + encodeURIComponent(evalId);
  return a;
}

function cell(content) {
  const td = document.createElement("td");
  if (content instanceof Node) td.append(content); else td.textContent = String(content);
  return td;
}

function duration(s) {
  const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), sec = Math.floor(s % 60);
  return (h ? h + "h " : "") + (h || m ? m + "m " : "") + sec + "s";
}

function ms(value) { return value == null ? "–" : value.toFixed(1) + " ms"; }

function clock(ts) { return new Date(ts).toISOString().slice(11, 23); }

function counter(name, value) {
  const box = text("div", "", "counter");
  box.append(text("b", String(value)), text("span", name));
  return box;
}

// --- the home view ---------------------------------------------------------------------------

async function refresh() {
  try {
    const [status, health, history] = await Promise.all([
      api("status").then(r => r.json()), fetch("health").then(r => r.json()),
      api("throughput").then(r => r.ok ? r.json() : null)]);
    $("worker").textContent = status.worker_id;
    $("uptime").textContent = duration(status.uptime_s);
    $("strategy").textContent = status.strategy;
    $("health").textContent = health.status;
    $("health").style.color = health.status === "healthy" ? "var(--ok)" : "var(--warn)";
    const c = status.counters;
    const shown = [["pulled", c.pulled], ["routed", c.routed], ["completed", c.completed],
      ["failed", c.failed], ["reported", c.reported], ["retries", c.retries],
      ["in flight", status.in_flight], ["waiting for a slot", status.waiting],
      ["routed / min", status.routed_last_minute]];
    $("counters").replaceChildren(...shown.map(([name, value]) => counter(name, value)));
    const durations = new Map();
    if (history) {
      perSecond = history.per_second;
      draw();
      for (const d of history.durations) durations.set(d.executor, d);
    }
    $("executors").replaceChildren(...status.executors.map((x) => {
      const row = document.createElement("tr");
      const health = text("td", x.healthy ? "healthy" : "down");
      health.prepend(text("span", "", "dot " + (x.healthy ? "up" : "down")));
      health.title = x.health_reason;
      const d = durations.get(x.url);
      row.append(text("td", x.url + (x.drained ? " (drained)" : "")), health,
        text("td", x.in_flight + " / " + x.capacity), text("td", ms(x.latency_ms)),
        text("td", d ? ms(d.p50_ms) : "–"), text("td", d ? ms(d.p95_ms) : "–"),
        text("td", x.routed), text("td", x.completed), text("td", x.failed));
      return row;
    }));
    controlsState(status);
  } catch (err) {
    if (err instanceof Unauthorized) return;
    $("health").textContent = "unreachable";
    $("health").style.color = "var(--bad)";
  }
}

async function refreshLists() {
  // Each part on its own: one that fails (the queue unreachable, say) leaves the others shown.
  await Promise.all([refreshBacklog(), refreshInFlight(), refreshFailures()].map(
    part => part.catch((err) => { if (!(err instanceof Unauthorized)) console.warn(err); })));
}

async function refreshBacklog() {
  const backlog = await (await api("queue/backlog")).json();
  const running = backlog.queues.filter(q => q.running != null);
  $("backlog").replaceChildren(
    counter("queued", backlog.queued == null ? "?" : backlog.queued),
    counter("running", running.length ? running.reduce((n, q) => n + q.running, 0) : "?"));
  $("backlog-note").textContent = backlog.queues.map(q => q.url +
    (backlog.queues.length > 1 && q.queued != null ? " " + q.queued : "") +
    (q.reachable ? "" : " unreachable") + (q.error ? ": " + q.error : "")).join("; ");
}

async function refreshInFlight() {
  const inFlight = await (await api("tasks?state=in_flight&limit=20")).json();
  const now = Date.now();
  $("inflight").replaceChildren(...inFlight.tasks.map((t) => {
    const row = document.createElement("tr");
    row.append(cell(taskLink(t.eval_id)), cell(t.executor || "–"),
      cell(t.since_ms == null ? "–" : duration(Math.max(0, now - t.since_ms) / 1000)));
    return row;
  }));
}

async function refreshFailures() {
  const failed = await (await api("tasks?state=failed&limit=15")).json();
  await Promise.all(failed.tasks.map(t => failureReason(t).catch(() => {})));
  $("failures").replaceChildren(...failed.tasks.map((t) => {
    const row = document.createElement("tr");
    row.append(cell(taskLink(t.eval_id)), cell(t.since_ms == null ? "–" : clock(t.since_ms)),
      cell(failureReasons.get(t.eval_id + ":" + t.since_ms) || "…"));
    return row;
  }));
}

function redacted(value) {
  if (value && typeof value === "object" && value.redacted) {
    return "(redacted: " + value.bytes + " bytes, sha256 " + String(value.sha256).slice(0, 12) +
      "…)";
  }
  return typeof value === "string" ? value : JSON.stringify(value);
}

async function failureReason(t) {
  // The list holds state and executor only: the reason is in the task's history (fetched once
  // per failure; a failed task does not change unless it fails again).
  const key = t.eval_id + ":" + t.since_ms;
  if (failureReasons.has(key)) return;
  const resp = await api("tasks/" + encodeURIComponent(t.eval_id));
  if (!resp.ok) return;
  const history = await resp.json();
  const last = history.entries.map(e => e.event)
    .filter(e => e.type === "task.failed" || e.type === "task.rejected").pop();
  if (last === undefined) return;
  let reason = last.reason || last.type;
  if (last.error !== undefined && last.error !== null && last.error !== "") {
    reason += ": " + redacted(last.error).slice(0, 200);
  }
  failureReasons.set(key, reason);
  if (failureReasons.size > 500) failureReasons.delete(failureReasons.keys().next().value);
}

function draw() {
  const canvas = $("chart"), ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  // Buckets end at the newest second the server counted (its clock, not this browser's).
  const newest = perSecond.length ? perSecond[perSecond.length - 1].second * 1000 : Date.now();
  const end = Math.floor(newest / BUCKET_MS) * BUCKET_MS;
  const done = new Map(), failed = new Map();
  for (const s of perSecond) {
    const bucket = Math.floor(s.second * 1000 / BUCKET_MS) * BUCKET_MS;
    done.set(bucket, (done.get(bucket) || 0) + s.completed);
    failed.set(bucket, (failed.get(bucket) || 0) + s.failed);
  }
  const values = [];
  for (let i = BUCKETS - 1; i >= 0; i--) {
    const bucket = end - i * BUCKET_MS;
    values.push([done.get(bucket) || 0, failed.get(bucket) || 0]);
  }
  const top = Math.max(1, ...values.map(([a, b]) => a + b)), bar = w / BUCKETS;
  values.forEach(([ok, bad], i) => {
    const okH = (ok / top) * (h - 18), badH = (bad / top) * (h - 18);
    ctx.fillStyle = "#58a6ff";
    ctx.fillRect(i * bar + 1, h - okH, bar - 2, okH);
    ctx.fillStyle = "#f85149";
    ctx.fillRect(i * bar + 1, h - okH - badH, bar - 2, badH);
  });
  ctx.fillStyle = "#8796a8";
  ctx.font = "11px sans-serif";
  ctx.fillText("max " + top + " per 5 s", 4, 12);
}

// --- controls (POST /admin/*, an admin token) ------------------------------------------------

function controlsState(status) {
  const p = status.paused;
  $("pause-state").textContent = p ? "pulling paused (" + p.scope + ") by " + p.by + ": " +
    p.reason : "pulling: running";
  const select = $("ctl-executor"), chosen = select.value;
  const urls = status.executors.map(x => x.url);
  if (urls.join(" ") !== Array.from(select.options, o => o.value).join(" ")) {
    select.replaceChildren(...urls.map((url) => {
      const option = text("option", url);
      option.value = url;
      return option;
    }));
    if (urls.includes(chosen)) select.value = chosen;
  }
}

async function act(action, body) {
  const reason = $("ctl-reason").value.trim();
  const out = $("ctl-result");
  if (!reason) {
    out.textContent = "Enter a reason first: it is recorded with the action.";
    $("ctl-reason").focus();
    return;
  }
  try {
    const resp = await api("admin/" + action, {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify(Object.assign({reason}, body))});
    const answer = await resp.json().catch(() => ({}));
    if (resp.status === 202) {
      out.textContent = action + " recorded (" + answer.scope + ", entry " + answer.entry_id + ")";
      $("ctl-reason").value = "";
      refresh();
    } else if (resp.status === 403) {
      out.textContent = action + " needs an admin token (ADMIN_TOKEN).";
    } else {
      out.textContent = action + " refused: HTTP " + resp.status + " " + (answer.detail || "");
    }
  } catch (err) {
    if (!(err instanceof Unauthorized)) out.textContent = action + " failed: " + err;
  }
}

// --- the live tail ---------------------------------------------------------------------------

function kind(type) {
  if (type === "task.completed") return "t-completed";
  if (type === "task.failed" || type === "task.rejected") return "t-failed";
  if (type === "executor.health_changed" || type === "executor.ejected") return "t-health";
  if (type.startsWith("queue.") || type === "pull.interrupted") return "t-health";
  return "";
}

function detail(e) {
  const parts = [];
  for (const key of ["executor", "reason", "strategy", "attempt", "outcome", "healthy", "by"]) {
    if (e[key] !== undefined && e[key] !== null) parts.push(key + "=" + e[key]);
  }
  return parts.join(" ");
}

function after(id, other) {  // stream ids <ms>-<seq>, compared as numbers
  const [a, b] = id.split("-").map(BigInt), [c, d] = other.split("-").map(BigInt);
  return a > c || (a === c && b > d);
}

function shownInTail(entry) {
  const e = entry.event;
  const type = $("f-type").value.trim(), executor = $("f-executor").value.trim();
  const evalId = $("f-eval").value.trim();
  if (type && !e.type.includes(type)) return false;
  if (executor && !String(e.executor || "").includes(executor)) return false;
  if (evalId && !String(e.eval_id || "").includes(evalId)) return false;
  return true;
}

function addLine(entry) {
  const e = entry.event, box = $("events"), top = box.firstElementChild;
  const flip = e.type === "executor.health_changed";
  if (flip && $("f-fold").checked && top !== null && top.dataset.flip === e.executor) {
    // Consecutive flips of one executor fold into one line: the latest, and how many.
    const n = Number(top.dataset.folded) + 1;
    top.dataset.folded = String(n);
    top.children[0].textContent = clock(entry.ts) + "  ";
    top.children[3].textContent = detail(e) + "  (×" + n + " flips)";
    return;
  }
  const line = text("div", "", "entry");
  const id = text("span", (e.eval_id || "").padEnd(16) + "  ");
  if (e.eval_id) id.replaceChildren(taskLink(e.eval_id), (" ").repeat(
    Math.max(2, 18 - e.eval_id.length)));
  line.append(text("span", clock(entry.ts) + "  ", "t-dim"),
    text("span", e.type.padEnd(24), kind(e.type)), id, text("span", detail(e), "t-dim"));
  if (flip) { line.dataset.flip = e.executor; line.dataset.folded = "1"; }
  box.prepend(line);
  while (box.childElementCount > MAX_LINES) box.lastChild.remove();
}

function renderTail() {
  $("events").replaceChildren();
  for (const entry of tail) if (shownInTail(entry)) addLine(entry);
  $("tail-note").textContent = tailPaused ? heldBack + " new entries held back" : "";
}

function onEntry(msg) {
  const entry = JSON.parse(msg.data);
  if (lastId !== null && !after(entry.id, lastId)) return;
  lastId = entry.id;
  tail.push(entry);
  if (tail.length > MAX_KEPT) tail.splice(0, tail.length - MAX_KEPT);
  if (tailPaused) {
    heldBack += 1;
    $("tail-note").textContent = heldBack + " new entries held back";
    return;
  }
  if (shownInTail(entry)) addLine(entry);
}

// --- one task's page -------------------------------------------------------------------------

async function knownActions() {
  // Cancel and retry are offered only when this worker's API document declares them.
  if (actions !== null) return actions;
  try {
    const spec = await (await fetch("openapi.json", {cache: "no-store"})).json();
    const paths = spec.paths || {};
    actions = {
      cancel: Boolean((paths["/tasks/{eval_id}/cancel"] || {}).post),
      retry: Boolean((paths["/tasks/{eval_id}/retry"] || {}).post),
    };
  } catch (err) {
    actions = {cancel: false, retry: false};
  }
  return actions;
}

function eventDetail(e) {
  const parts = [];
  if (e.type === "executor.selected") {
    parts.push("chose " + e.executor + " by " + e.strategy + (e.why ? ": " + e.why : ""));
    for (const c of e.candidates || []) {
      parts.push("  " + c.executor + (c.healthy ? " healthy" : " unhealthy") + ", in flight " +
        c.in_flight + (c.latency_ms != null ? ", " + c.latency_ms.toFixed(1) + " ms" : "") +
        (c.drained ? ", drained" : ""));
    }
    return parts.join("\n");
  }
  for (const key of ["executor", "attempt", "reason", "delay_ms", "duration_ms", "outcome",
    "http_status", "action", "queue", "lease_s", "by", "new_eval_id"]) {
    const value = e[key];
    if (value === undefined || value === null) continue;
    parts.push(key + "=" + (typeof value === "number" && !Number.isInteger(value) ?
      value.toFixed(1) : value));
  }
  if (e.error !== undefined && e.error !== null && e.error !== "") {
    parts.push("error=" + redacted(e.error).slice(0, 300));
  }
  return parts.join(" ");
}

async function showTask(evalId) {
  $("task-id").textContent = evalId;
  $("task-missing").hidden = true;
  const resp = await api("tasks/" + encodeURIComponent(evalId));
  if (!resp.ok) {
    const body = await resp.json().catch(() => ({}));
    $("task-missing").textContent = resp.status === 404 ? "No entry about this eval_id." :
      "HTTP " + resp.status + ": " + (body.detail || "");
    $("task-missing").hidden = false;
    $("task-summary").replaceChildren();
    $("task-outcome").replaceChildren();
    $("task-timeline").replaceChildren();
    $("task-actions").hidden = true;
    return;
  }
  const history = await resp.json();
  const entries = history.entries;
  const attempts = Math.max(0, ...entries.map(x => x.event.attempt || 0));
  const took = entries.length ? entries[entries.length - 1].ts - entries[0].ts : 0;
  $("task-summary").replaceChildren(counter("state", history.state || "?"),
    counter("executor", history.executor || "–"), counter("attempts", attempts),
    counter("pulled → last step", (took / 1000).toFixed(3) + " s"));
  const outcome = entries.map(x => x.event)
    .filter(e => e.type === "task.completed" || e.type === "task.failed" ||
      e.type === "task.rejected").pop();
  const shown = [];
  if (outcome !== undefined) {
    const title = outcome.type === "task.completed" ? "result" : "error (" + outcome.reason + ")";
    const body = outcome.type === "task.completed" ? outcome.result :
      (outcome.error !== undefined ? outcome.error : outcome.excerpt);
    shown.push(text("h2", title), text("pre", JSON.stringify(body, null, 2).slice(0, 8000)));
  }
  $("task-outcome").replaceChildren(...shown);
  let previous = null;
  $("task-timeline").replaceChildren(...entries.map((x) => {
    const row = document.createElement("tr");
    const gap = previous === null ? "" : "+" + (x.ts - previous) + " ms";
    previous = x.ts;
    const details = text("td", eventDetail(x.event));
    details.style.whiteSpace = "pre-wrap";
    row.append(text("td", clock(x.ts)), text("td", gap),
      text("td", x.event.type, kind(x.event.type)), text("td", x.worker_id), details);
    return row;
  }));
  const can = await knownActions();
  $("task-cancel").hidden = !can.cancel;
  $("task-retry").hidden = !can.retry;
  $("task-actions").hidden = !(can.cancel || can.retry);
  // Cancel is for a task still held (waiting or in flight), retry for a finished one.
  const finished = history.state === "completed" || history.state === "failed";
  $("task-cancel").title = finished ? "the task is finished" : "";
  $("task-retry").title = finished ? "" : "only a finished task can be retried";
}

async function taskAction(action) {
  const evalId = currentTask(), out = $("task-action-result");
  const reason = $("task-reason").value.trim();
  if (evalId === null) return;
  if (!reason) {
    out.textContent = "Enter a reason first.";
    $("task-reason").focus();
    return;
  }
  try {
    const resp = await api("tasks/" + encodeURIComponent(evalId) + "/" + action, {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({reason})});
    const answer = await resp.json().catch(() => ({}));
    if (resp.status === 404 || resp.status === 405) {
      $("task-" + action).disabled = true;
      out.textContent = action + " is not available: " + (answer.detail || resp.status);
    } else if (resp.ok) {
      out.replaceChildren(action + " recorded by " + answer.by);
      if (answer.new_eval_id) out.append(": runs again as ", taskLink(answer.new_eval_id));
      $("task-reason").value = "";
      showTask(evalId);
    } else {
      out.textContent = action + " refused: HTTP " + resp.status + " " + (answer.detail || "");
    }
  } catch (err) {
    if (!(err instanceof Unauthorized)) out.textContent = action + " failed: " + err;
  }
}

// --- views -----------------------------------------------------------------------------------

function currentTask() {
  if (!location.hash.startsWith(TASK_ROUTE)) return null;
  try {
    return decodeURIComponent(location.hash.slice(TASK_ROUTE.length)) || null;
  } catch (err) {
    return null;
  }
}

function route() {
  if (signedOut) return;
  const evalId = currentTask();
  for (const el of document.querySelectorAll("section.home")) el.hidden = evalId !== null;
  $("task-view").hidden = evalId === null;
  if (evalId !== null) {
    $("task-cancel").disabled = false;
    $("task-retry").disabled = false;
    $("task-action-result").textContent = "";
    showTask(evalId).catch(() => {});
  }
}

// --- authentication -------------------------------------------------------------------------
// The token is kept in this tab's sessionStorage and sent as a bearer token on fetches. The
// event stream (an EventSource cannot send headers) opens with a single-use ticket from
// POST /events/ticket, so the token never goes into a URL.

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token()) headers.Authorization = "Bearer " + token();
  const resp = await fetch(path, Object.assign({}, options, {headers, cache: "no-store"}));
  if (resp.status === 401) {
    const body = await resp.json().catch(() => ({}));
    showLogin(token() ? "That token was refused." : (body.detail || "A token is needed."));
    throw new Unauthorized();
  }
  return resp;
}

function showLogin(hint) {
  signedOut = true;
  if (source !== null) { source.close(); source = null; }
  $("login-hint").textContent = hint;
  $("login").hidden = false;
  $("logout").hidden = true;
  for (const el of document.querySelectorAll("section.data")) el.hidden = true;
  $("conn").textContent = "signed out";
  $("token-input").focus();
}

function showData() {
  signedOut = false;
  $("login").hidden = true;
  $("logout").hidden = !token();
  route();
}

async function connect() {
  if (connecting || signedOut || source !== null) return;
  connecting = true;
  try {
    const {ticket} = await (await api("events/ticket", {method: "POST"})).json();
    const query = new URLSearchParams({last: "100", ticket});
    const opened = new EventSource("events/stream?" + query);
    source = opened;
    opened.onmessage = onEntry;
    opened.onopen = () => { $("conn").textContent = "live"; };
    // A ticket is good for one connection, so the browser's own reconnect (which would
    // send the spent ticket again) is replaced by a new connection with a new ticket.
    opened.onerror = () => {
      $("conn").textContent = "reconnecting…";
      opened.close();
      if (source === opened) source = null;
      setTimeout(connect, 2000);
    };
  } catch (err) {
    if (!(err instanceof Unauthorized)) setTimeout(connect, 2000);
  } finally {
    connecting = false;
  }
}

async function start() {
  showData();
  await refresh();
  if (!signedOut) {
    refreshLists();
    connect();
  }
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
  $("token-input").value = "";
  start();
});
$("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  showLogin("Signed out.");
});
$("search").addEventListener("submit", (event) => {
  event.preventDefault();
  const evalId = $("search-input").value.trim();
  if (evalId) location.hash = TASK_ROUTE + encodeURIComponent(evalId);
});
window.addEventListener("hashchange", route);
$("ctl-pause").addEventListener("click", () => act("pause", {}));
$("ctl-resume").addEventListener("click", () => act("resume", {}));
$("ctl-drain").addEventListener("click", () => act("drain", {executor: $("ctl-executor").value}));
$("ctl-undrain").addEventListener("click",
  () => act("undrain", {executor: $("ctl-executor").value}));
$("task-cancel").addEventListener("click", () => taskAction("cancel"));
$("task-retry").addEventListener("click", () => taskAction("retry"));
for (const id of ["f-type", "f-executor", "f-eval"]) $(id).addEventListener("input", renderTail);
$("f-fold").addEventListener("change", renderTail);
$("tail-pause").addEventListener("click", () => {
  tailPaused = !tailPaused;
  $("tail-pause").textContent = tailPaused ? "resume tail" : "pause tail";
  if (!tailPaused) heldBack = 0;
  renderTail();
});

start();
draw();
setInterval(() => { if (!signedOut) refresh(); }, 2000);
setInterval(() => {
  if (signedOut) return;
  const evalId = currentTask();
  if (evalId === null) refreshLists(); else showTask(evalId).catch(() => {});
}, 3000);
setInterval(draw, 1000);
