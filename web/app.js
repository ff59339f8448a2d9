// The agentcast page: sign in, start runs, watch their events live. Built on agentcast.js and
// meant to be read as an example of using it. Every piece of text that comes from the server
// is put in the page with textContent (via el() below), never as HTML.

import { AgentcastClient } from "/agentcast.js";

// ---- small DOM helpers ------------------------------------------------------------------------

const byId = (testid, root = document) => root.querySelector(`[data-testid="${testid}"]`);

/** Makes an element. `props`: class, text (textContent), data-* and other attributes. Children
 *  that are strings become text nodes. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "onclick") node.addEventListener("click", value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function json(value, pretty = false) {
  if (value === undefined) return "";
  const compact = JSON.stringify(value);
  return pretty && compact.length > 60 ? JSON.stringify(value, null, 2) : compact;
}

function parseTs(ts) {
  // RFC 3339 with microseconds; Date wants at most milliseconds.
  const ms = Date.parse(String(ts).replace(/(\.\d{3})\d+/, "$1"));
  return Number.isNaN(ms) ? null : ms;
}

function formatMs(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return "";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)} s`;
  return `${Math.floor(ms / 60_000)} min ${Math.round((ms % 60_000) / 1000)} s`;
}

// ---- presets ----------------------------------------------------------------------------------

const manySteps = [];
for (let i = 1; i <= 12; i++) {
  manySteps.push({ think: `Step ${i} of 12` }, { sleep_ms: 150 }, { text: `part ${i}. ` });
}

const PRESETS = [
  { id: "echo", label: "Echo", agent: "echo", input: "Hello from agentcast! This sentence streams back in small pieces." },
  {
    id: "tools", label: "Tools", agent: "scripted",
    input: { steps: [
      { think: "The user wants 2+3*4 and the time. I will use the calculator and the clock." },
      { tool: "calculator", args: { expr: "2+3*4" } },
      { tool: "clock" },
      { text: "2+3*4 is 14. " },
      { tool: "sleep", args: { ms: 1500 } },
      { text: "And I waited a second and a half, with progress." },
    ] },
  },
  {
    id: "failing-tool", label: "Failing tool", agent: "scripted",
    input: { steps: [
      { think: "This tool will fail; I will carry on without it." },
      { tool: "fail", args: { message: "the weather service is down" } },
      { text: "I could not check the weather, sorry." },
    ] },
  },
  {
    id: "tool-panic", label: "Tool panic", agent: "scripted",
    input: { steps: [
      { think: "Calling a tool that panics: the server reports it and restarts the tool." },
      { tool: "panic" },
      { text: "The tool panicked; the run went on." },
    ] },
  },
  {
    id: "agent-panic", label: "Agent panic", agent: "scripted",
    input: { steps: [{ think: "About to panic." }, { text: "Some text first. " }, { panic: true }] },
  },
  {
    id: "agent-fail", label: "Agent fails", agent: "scripted",
    input: { steps: [{ think: "This cannot be done." }, { fail: "I give up: the task is impossible" }] },
  },
  {
    id: "long-sleep", label: "Long sleep (cancel me)", agent: "scripted",
    input: { steps: [
      { think: "This will take a minute. Press Cancel." },
      { tool: "sleep", args: { ms: 60000 } },
      { text: "Done sleeping." },
    ] },
  },
  { id: "many-steps", label: "Many steps", agent: "scripted", input: { steps: manySteps } },
  {
    id: "ask", label: "Ask me (approval and a question)", agent: "scripted",
    input: { steps: [
      { think: "I need your yes before I use the calculator, and then a detail only you know." },
      { tool: "calculator", args: { expr: "6*7" }, approve: true },
      { ask: "Who should get the result, and how many copies?", schema: {
        type: "object",
        properties: {
          recipient: { type: "string", title: "Recipient", minLength: 1, maxLength: 80 },
          copies: { type: "integer", title: "Copies", minimum: 1, maximum: 10, default: 1 },
          format: { title: "Format", enum: ["pdf", "html", "text"] },
          urgent: { type: "boolean", title: "Urgent" },
        },
        required: ["recipient", "copies"],
      } },
      { text: "Thank you: noted, and done." },
    ] },
  },
];

const DEFAULT_PRESET = { echo: "echo", scripted: "tools" };

// ---- state ------------------------------------------------------------------------------------

const STORAGE_KEY = "agentcast.session";
let client = null;
/** {token, devUser}: devUser is set when the token came from the dev token route, so an
 *  expired one can be replaced. Kept in sessionStorage: a reload stays signed in. */
let session = null;
let agents = [];
/** run_id -> run view (see createRun) */
const runs = new Map();

// ---- sign in ----------------------------------------------------------------------------------

const NOT_DEV_MODE = "This server is not in dev mode: paste a token signed with its secret (agentcast token USER).";

let infoRequest = null;
/** GET /v1/info, asked once: {protocol, dev_mode, version}, or null when it cannot be read. */
function serverInfo() {
  infoRequest ??= fetch("/v1/info")
    .then((res) => (res.ok ? res.json() : null))
    .catch(() => null);
  return infoRequest;
}

async function devToken(user) {
  const info = await serverInfo();
  if (info && !info.dev_mode) {
    // POST /v1/dev/token only exists in dev mode.
    showTokenForm();
    throw new Error(NOT_DEV_MODE);
  }
  const res = await fetch("/v1/dev/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ user }),
  });
  const body = await res.json().catch(() => ({}));
  if (!res.ok || !body.token) throw new Error(body.message || `the server answered ${res.status}`);
  return body.token;
}

function userOfToken(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(payload)).sub ?? null;
  } catch {
    return null;
  }
}

async function signIn(token, devUser = null) {
  const res = await fetch("/v1/agents", { headers: { Authorization: `Bearer ${token}` } });
  if (res.status === 401) {
    const body = await res.json().catch(() => ({}));
    throw new Error(`The server refused this token${body.message ? `: ${body.message}` : ""}.`);
  }
  if (!res.ok) throw new Error(`GET /v1/agents answered ${res.status}`);
  const catalog = await res.json();
  agents = catalog.agents || [];
  session = { token, devUser };
  sessionStorage.setItem(STORAGE_KEY, JSON.stringify(session));
  showCatalog(catalog);

  byId("signin").hidden = true;
  byId("app").hidden = false;
  byId("whoami").hidden = false;
  byId("user-name").textContent = userOfToken(token) ?? "?";

  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  client = new AgentcastClient({
    url: `${scheme}//${location.host}/v1/ws`,
    token: tokenForConnect,
    // Show the runs this user already has (other tabs, before a reload).
    history: true,
  });
  client.on("status", showStatus);
  client.on("welcome", onWelcome);
  client.on("event", renderEvent);
  client.on("resumed", onResumed);
  client.on("resume_gap", onResumeGap);
  client.on("gap", (g) => notice("gap", `A heartbeat showed missed events #${g.from}–#${g.to}; ${g.action === "resume" ? "asking for them" : "reconnecting to get them"}.`));
  client.on("error", (f) => notice("error", `Server error ${f.code}: ${f.message}`));
  client.connect().catch(() => {}); // only fails if closed first (sign out)
}

/** Called by the client before each connection attempt. A browser cannot see why a WebSocket
 *  upgrade failed, so after a couple of failed attempts ask over HTTP whether the token is
 *  still good; a dev token is then renewed, any other means signing in again. */
async function tokenForConnect() {
  if (client && client.attempt >= 2 && (await tokenRefused(session.token))) {
    if (session.devUser) {
      session.token = await devToken(session.devUser);
      sessionStorage.setItem(STORAGE_KEY, JSON.stringify(session));
    } else {
      notice("error", "The server no longer accepts this token (expired?): sign out and sign in again.");
      client.close();
      throw new Error("token refused");
    }
  }
  return session.token;
}

async function tokenRefused(token) {
  try {
    const res = await fetch("/v1/agents", { headers: { Authorization: `Bearer ${token}` } });
    return res.status === 401;
  } catch {
    return false; // the server is unreachable: nothing to say about the token
  }
}

function showTokenForm() {
  byId("signin-dev-form").hidden = true;
  byId("mode-hint").hidden = true;
  byId("token-details").open = true;
}

function signOut() {
  sessionStorage.removeItem(STORAGE_KEY);
  if (client) client.close();
  location.reload();
}

function setupSignIn() {
  const error = byId("signin-error");
  const busy = async (button, work) => {
    error.textContent = "";
    button.disabled = true;
    try {
      await work();
    } catch (e) {
      error.textContent = e.message;
    } finally {
      button.disabled = false;
    }
  };
  byId("signin-dev-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const user = byId("signin-user").value.trim();
    busy(byId("signin-button"), async () => signIn(await devToken(user), user));
  });
  byId("signin-token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = byId("signin-token").value.trim();
    busy(byId("signin-token-button"), () => signIn(token));
  });
  byId("sign-out").addEventListener("click", signOut);
  // Without dev mode, a token is the only way in: open its form and say so at once.
  serverInfo().then((info) => {
    if (info && !info.dev_mode) {
      byId("mode-hint").textContent = NOT_DEV_MODE;
      byId("token-details").open = true;
    }
  });

  let saved = null;
  try {
    saved = JSON.parse(sessionStorage.getItem(STORAGE_KEY));
  } catch {
    sessionStorage.removeItem(STORAGE_KEY);
  }
  if (saved && saved.token) {
    busy(byId("signin-button"), async () => {
      try {
        await signIn(saved.token, saved.devUser ?? null);
      } catch (e) {
        // An expired dev token: get a new one for the same user.
        if (!saved.devUser) throw e;
        await signIn(await devToken(saved.devUser), saved.devUser);
      }
    });
  }
}

// ---- connection status and notices ------------------------------------------------------------

function showStatus({ state, attempt, delayMs }) {
  const box = byId("connection-status");
  box.dataset.state = state;
  const label = {
    idle: "not connected",
    connecting: "connecting…",
    open: "live",
    reconnecting: `reconnecting${delayMs ? ` in ${formatMs(delayMs)}` : ""}${attempt > 1 ? ` (attempt ${attempt})` : ""}…`,
    closed: "disconnected",
  }[state] ?? state;
  byId("connection-label").textContent = label;
}

function notice(kind, text, attrs = {}) {
  const list = byId("notices");
  const item = el("div", { class: `notice notice-${kind}`, "data-testid": `${kind}-notice`, role: "status", ...attrs },
    el("span", { class: "notice-time", text: new Date().toLocaleTimeString() }),
    el("span", { class: "notice-text", text }),
    el("button", { type: "button", class: "link notice-close", "aria-label": "dismiss", text: "×", onclick: () => item.remove() }));
  list.prepend(item);
  while (list.children.length > 4) list.lastChild.remove();
  return item;
}

function onWelcome(w) {
  if (w.epochChanged) {
    // The server lost this user's history (e.g. it restarted): runs still open here can never
    // finish. Their events cannot come back.
    for (const run of runs.values()) {
      if (run.done) continue;
      setStatus(run, "lost", "lost: the server restarted");
      retireQuestions(run, "lost", "lost: the server restarted");
      for (const tool of run.tools.values()) {
        if (tool.card.dataset.state === "running") {
          tool.card.dataset.state = "lost";
          tool.progress.parentElement.hidden = true;
        }
      }
    }
  }
}

function onResumed(r) {
  if (r.source !== "connect") return;
  if (r.reconnect) {
    const dupes = r.replayed - r.delivered;
    notice("reconnect",
      `Reconnected: ${r.replayed} event${r.replayed === 1 ? "" : "s"} replayed` +
      (dupes > 0 ? ` (${r.delivered} new, ${dupes} already shown)` : "") + ".",
      { "data-replayed": r.replayed, "data-delivered": r.delivered });
  } else if (r.replayed > 0) {
    notice("history", `Loaded ${r.replayed} earlier event${r.replayed === 1 ? "" : "s"} of this user.`,
      { "data-replayed": r.replayed });
  }
}

function onResumeGap(g) {
  let text;
  if (g.epochChanged) {
    text = "The server's history was reset (it restarted): earlier events cannot be replayed.";
  } else if (g.lost_from !== null && g.lost_to >= g.lost_from) {
    text = `Events #${g.lost_from}–#${g.lost_to} are no longer kept by the server and were not shown.`;
  } else {
    text = "Some events could not be replayed.";
  }
  notice("gap", text);
}

// ---- the start form ---------------------------------------------------------------------------

function showCatalog(catalog) {
  const select = byId("agent-select");
  select.replaceChildren(...agents.map((a) => el("option", { value: a.name, text: a.name })));
  const toolList = byId("tool-list");
  toolList.replaceChildren(...(catalog.tools || []).map((t) =>
    el("li", {}, el("code", { text: t.name }), " ", el("span", { class: "muted", text: t.description }))));

  const presets = byId("presets");
  const names = new Set(agents.map((a) => a.name));
  presets.replaceChildren(...PRESETS.filter((p) => names.has(p.agent)).map((p) =>
    el("button", { type: "button", class: "chip", "data-testid": `preset-${p.id}`, title: `${p.agent}: ${json(p.input)}`, text: p.label, onclick: () => usePreset(p) })));

  select.addEventListener("change", () => chooseAgent(select.value, true));
  if (agents.length) chooseAgent(names.has("scripted") ? "scripted" : agents[0].name, true);
  byId("start-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    startRun();
  });
  byId("run-input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      startRun();
    }
  });
  byId("clear-finished").addEventListener("click", () => {
    for (const [id, run] of runs) {
      if (run.done) {
        run.card.remove();
        runs.delete(id);
      }
    }
    updateRunCount();
  });
}

function chooseAgent(name, withDefaultInput) {
  byId("agent-select").value = name;
  const agent = agents.find((a) => a.name === name);
  byId("agent-description").textContent = agent ? agent.description : "";
  if (withDefaultInput) {
    const preset = PRESETS.find((p) => p.id === DEFAULT_PRESET[name]);
    byId("run-input").value = preset ? json(preset.input, true) : '"hello"';
  }
  for (const chip of byId("presets").children) chip.classList.remove("active");
}

function usePreset(preset) {
  chooseAgent(preset.agent, false);
  byId("run-input").value = json(preset.input, true);
  for (const chip of byId("presets").children) chip.classList.toggle("active", chip.dataset.testid === `preset-${preset.id}`);
}

async function startRun() {
  const error = byId("start-error");
  error.textContent = "";
  const agent = byId("agent-select").value;
  let input;
  try {
    input = JSON.parse(byId("run-input").value);
  } catch (e) {
    error.textContent = `The input is not valid JSON (${e.message}). A string needs quotes: "hello".`;
    return;
  }
  const threadId = byId("thread-id").value.trim() || undefined;
  const button = byId("start-run");
  button.disabled = true;
  try {
    const runId = await client.start(agent, input, { threadId });
    const form = byId("start-form");
    form.dataset.lastRunId = runId;
    byId("start-result").textContent = `started ${runId}`;
  } catch (e) {
    error.textContent = `${e.code ? `${e.code}: ` : ""}${e.message}`;
  } finally {
    button.disabled = false;
  }
}

// ---- runs and their timelines -----------------------------------------------------------------

function updateRunCount() {
  const total = runs.size;
  const running = [...runs.values()].filter((r) => !r.done).length;
  byId("run-count").textContent = total ? `${total} run${total === 1 ? "" : "s"}, ${running} running` : "";
  byId("no-runs").hidden = total > 0;
}

function createRun(e) {
  const run = {
    id: e.run_id,
    agent: e.type === "agent_started" ? e.data.agent : "?",
    done: false,
    startedTs: parseTs(e.ts),
    startedLocal: Date.now(),
    tools: new Map(),
    /** interrupt_id -> question view (see renderQuestion) */
    questions: new Map(),
    /** input_received that came before its input_requested (a `resume` replay can deliver
     *  earlier events after later ones): interrupt_id -> {e, line}, line showing it alone */
    earlyAnswers: new Map(),
    answer: null,
  };
  run.status = el("span", { class: "badge", "data-testid": "run-status", text: "running" });
  run.elapsed = el("span", { class: "elapsed muted", "data-testid": "run-duration" });
  run.cancel = el("button", { type: "button", class: "danger small-btn", "data-testid": "cancel-run", text: "Cancel" });
  run.cancel.addEventListener("click", () => cancelRun(run));
  run.error = el("p", { class: "error", "data-testid": "run-error" });
  run.timeline = el("ol", { class: "timeline", "data-testid": "timeline" });
  run.card = el("article", {
    class: "run card", "data-testid": "run", "data-run-id": run.id, "data-status": "running", "data-epoch": client.epoch,
  },
  el("header", { class: "run-head" },
    el("span", { class: "run-agent", "data-testid": "run-agent", text: run.agent }),
    el("code", { class: "run-id muted", "data-testid": "run-id", title: run.id, text: run.id }),
    e.thread_id ? el("span", { class: "thread muted", "data-testid": "run-thread", text: `thread ${e.thread_id}` }) : null,
    el("span", { class: "spacer" }),
    run.elapsed,
    run.status,
    run.cancel),
  run.error,
  run.timeline);
  runs.set(run.id, run);
  byId("runs").prepend(run.card);
  updateRunCount();
  return run;
}

function setStatus(run, status, label = status.replace("_", " ")) {
  run.card.dataset.status = status;
  run.status.textContent = label;
  run.status.className = `badge badge-${status}`;
  if (status !== "running") {
    run.done = true;
    run.cancel.hidden = true;
  }
  updateRunCount();
}

/** A running run with an open question waits for its user: the badge says so. */
function updateWaiting(run) {
  if (run.done) return;
  const waiting = [...run.questions.values()].some((q) => q.state === "open");
  run.card.dataset.waiting = String(waiting);
  run.status.textContent = waiting ? "waiting for you" : "running";
  run.status.className = `badge badge-${waiting ? "waiting" : "running"}`;
}

async function cancelRun(run) {
  run.cancel.disabled = true;
  run.cancel.textContent = "Cancelling…";
  run.error.textContent = "";
  try {
    await client.cancel(run.id);
  } catch (e) {
    run.error.textContent = `Cancel failed: ${e.code ? `${e.code}: ` : ""}${e.message}`;
    run.cancel.disabled = false;
    run.cancel.textContent = "Cancel";
  }
}

/** The element of one event: every rendered event carries its seq and type. Streamed text
 *  pieces show their seq and time on hover only, so the answer reads as one text. */
function eventEl(tag, e, cls, ...children) {
  const offset = e.type === "partial_result" ? null : runOffset(e);
  return el(tag, {
    class: `ev ${cls}`, "data-testid": "event", "data-seq": e.seq, "data-type": e.type,
    title: `#${e.seq} ${e.type} at ${e.ts}`,
  }, ...children, offset !== null ? el("span", { class: "ev-meta", text: `#${e.seq} · +${formatMs(offset)}` }) : null);
}

function runOffset(e) {
  const run = runs.get(e.run_id);
  const ts = parseTs(e.ts);
  if (!run || run.startedTs === null || ts === null) return null;
  return Math.max(0, ts - run.startedTs);
}

function isEmpty(value) {
  return value === null || value === undefined || (typeof value === "object" && Object.keys(value).length === 0);
}

function icon(glyph) {
  return el("span", { class: "icon", "aria-hidden": "true", text: glyph });
}

function errorText(err) {
  if (!err) return "";
  return `${err.code ?? "error"}: ${err.message ?? ""}`;
}

// ---- questions to the user: approvals and input (PROTOCOL.md section 12) ----------------------

const isPlainObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);

let nextDomId = 1;
const domId = (prefix) => `${prefix}-${nextDomId++}`;

/** Keywords that make a schema more than one plain field (or one object of them). */
const BEYOND_A_FORM = ["const", "oneOf", "anyOf", "allOf", "not", "if", "$ref", "$dynamicRef"];

/** How to ask for a value of `schema` with one form control: {kind, schema}, kind being text,
 *  number, integer, boolean or enum; null when the schema says more than one control can. */
function fieldFor(schema) {
  if (!isPlainObject(schema) || BEYOND_A_FORM.some((k) => Object.hasOwn(schema, k))) return null;
  if (Object.hasOwn(schema, "enum")) {
    const ok = Array.isArray(schema.enum) && schema.enum.length > 0 &&
      schema.enum.every((v) => ["string", "number", "boolean"].includes(typeof v));
    return ok ? { kind: "enum", schema } : null;
  }
  if (["string", "number", "integer", "boolean"].includes(schema.type)) {
    return { kind: schema.type === "string" ? "text" : schema.type, schema };
  }
  return null;
}

/** The form of an input question: `value` (one control, the answer is its value), `object`
 *  (a control per property, the answer is an object of the filled ones) or `json` (a JSON
 *  text area, for every other schema). No schema, or an empty one, takes any answer: a line of
 *  text. */
function formFor(schema) {
  if (schema === undefined || schema === null || schema === true || (isPlainObject(schema) && Object.keys(schema).length === 0)) {
    return { shape: "value", fields: [{ name: null, required: false, kind: "text", schema: {} }] };
  }
  const single = fieldFor(schema);
  if (single) return { shape: "value", fields: [{ name: null, required: true, ...single }] };
  if (isPlainObject(schema) && schema.type === "object" && isPlainObject(schema.properties) &&
      !BEYOND_A_FORM.some((k) => Object.hasOwn(schema, k))) {
    const required = Array.isArray(schema.required) ? schema.required : [];
    const fields = Object.entries(schema.properties).map(([name, sub]) => {
      const field = fieldFor(sub);
      return field && { name, required: required.includes(name), ...field };
    });
    if (fields.length > 0 && fields.every(Boolean) && required.every((r) => Object.hasOwn(schema.properties, r))) {
      return { shape: "object", fields };
    }
  }
  return { shape: "json" };
}

/** What a field's schema asks beyond its type, in words. */
function fieldHint(field) {
  const s = field.schema;
  const parts = [];
  if (field.kind === "integer") parts.push("a whole number");
  if (field.kind === "number" || field.kind === "integer") {
    const lo = s.minimum ?? s.exclusiveMinimum;
    const hi = s.maximum ?? s.exclusiveMaximum;
    if (typeof lo === "number" && typeof hi === "number") parts.push(`${lo} to ${hi}`);
    else if (typeof lo === "number") parts.push(`${s.minimum === undefined ? "more than" : "at least"} ${lo}`);
    else if (typeof hi === "number") parts.push(`${s.maximum === undefined ? "less than" : "at most"} ${hi}`);
  }
  if (field.kind === "text") {
    if (Number.isInteger(s.minLength) && s.minLength > 1) parts.push(`at least ${s.minLength} characters`);
    if (Number.isInteger(s.maxLength)) parts.push(`at most ${s.maxLength} characters`);
    if (typeof s.format === "string") parts.push(s.format);
    if (typeof s.pattern === "string") parts.push(`matching ${s.pattern}`);
  }
  if (typeof s.description === "string") parts.unshift(s.description);
  return parts.join(", ");
}

/** The control of one field, with its label; `labelledBy` labels a form's only control (the
 *  question's message is its label). */
function fieldControl(field, labelledBy) {
  const s = field.schema;
  const attrs = {
    "data-testid": "question-input", "data-field": field.name ?? undefined, "data-kind": field.kind,
    name: field.name ?? "answer", required: field.required, "aria-labelledby": labelledBy,
  };
  let control;
  switch (field.kind) {
    case "boolean":
      control = el("input", { type: "checkbox", ...attrs });
      control.checked = s.default === true;
      break;
    case "enum": {
      const placeholder = s.default === undefined || !s.enum.includes(s.default);
      control = el("select", attrs,
        placeholder ? el("option", { value: "", text: field.required ? "choose…" : "—" }) : null,
        ...s.enum.map((v, i) => el("option", { value: String(i), text: typeof v === "string" ? v : json(v) })));
      if (!placeholder) control.value = String(s.enum.indexOf(s.default));
      break;
    }
    case "number":
    case "integer":
      control = el("input", {
        type: "number", inputmode: field.kind === "integer" ? "numeric" : "decimal", step: field.kind === "integer" ? "1" : "any",
        min: typeof s.minimum === "number" ? s.minimum : undefined, max: typeof s.maximum === "number" ? s.maximum : undefined, ...attrs,
      });
      if (typeof s.default === "number") control.value = String(s.default);
      break;
    default:
      control = el("input", { type: "text", ...attrs });
      if (typeof s.default === "string") control.value = s.default;
  }
  const hint = fieldHint(field);
  const hintEl = hint ? el("span", { class: "field-hint muted", id: domId("q-hint"), text: hint }) : null;
  if (hintEl) control.setAttribute("aria-describedby", hintEl.id);
  if (labelledBy) return { control, node: el("div", { class: `question-field${field.kind === "boolean" ? " check" : ""}` }, control, hintEl) };
  const title = typeof s.title === "string" && s.title ? s.title : field.name;
  const mark = field.required ? el("span", { class: "required-mark", "aria-hidden": "true", title: "required", text: " *" }) : null;
  control.id = domId("q-field");
  const label = el("label", { for: control.id }, title, mark);
  const node = field.kind === "boolean"
    ? el("div", { class: "question-field check" }, el("div", { class: "check-row" }, control, label), hintEl)
    : el("div", { class: "question-field" }, label, control, hintEl);
  return { control, node };
}

/** Reads a control: {set, value} (set false: leave the property out), or {problem}. */
function readField(field, control) {
  const optional = field.name !== null;
  switch (field.kind) {
    case "boolean":
      return { set: true, value: control.checked };
    case "enum":
      if (control.value === "") return optional ? { set: false } : { problem: "Choose one of the options." };
      return { set: true, value: field.schema.enum[Number(control.value)] };
    case "number":
    case "integer":
      if (control.validity.badInput) return { problem: `${field.name ?? "The answer"} is not a number.` };
      if (control.value === "") return optional ? { set: false } : { problem: "Enter a number." };
      return { set: true, value: Number(control.value) };
    default:
      if (control.value === "" && optional) return { set: false };
      return { set: true, value: control.value };
  }
}

/** Two JSON values are the same (object keys in any order). */
function sameJson(a, b) {
  const canon = (v) => (Array.isArray(v) ? v.map(canon)
    : isPlainObject(v) ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, canon(v[k])])) : v);
  return JSON.stringify(canon(a)) === JSON.stringify(canon(b));
}

function countdown(ms) {
  const s = Math.ceil(ms / 1000);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function showExpiry(q) {
  if (q.expiresAt === null) return;
  const left = q.expiresAt - Date.now();
  q.expires.textContent = left > 0 ? `expires in ${countdown(left)}` : "expiring…";
}

/** The card of an `input_requested`: the question, a form to answer it, and once it is settled
 *  (`input_received`, from any tab) what became of it. */
function renderQuestion(run, e) {
  const d = e.data ?? {};
  const approval = d.kind === "approval";
  const messageId = domId("q-msg");
  const q = {
    id: d.interrupt_id, kind: approval ? "approval" : "input", state: "open", data: d,
    expiresAt: parseTs(d.expires_at), controls: [],
  };
  q.message = el("p", { class: "question-message", id: messageId, "data-testid": "question-message", text: d.message ?? "" });
  q.expires = el("span", {
    class: "question-expires muted small", "data-testid": "question-expires", "data-expires-at": d.expires_at,
    title: q.expiresAt === null ? `expires at ${d.expires_at}` : `expires at ${new Date(q.expiresAt).toLocaleString()}`,
  });
  q.error = el("p", { class: "error question-error", id: domId("q-err"), "data-testid": "question-error", role: "alert" });
  q.note = el("p", { class: "question-note", "data-testid": "question-note", role: "status" });

  const title = el("div", { class: "question-title" });
  if (approval) {
    title.append(el("strong", { text: "Approval needed" }), " to run ",
      el("strong", { class: "tool-name", "data-testid": "question-tool", text: d.tool ?? "?" }),
      d.tool_call_id ? el("span", { class: "muted small", text: ` ${d.tool_call_id}` }) : null);
  } else {
    title.append(el("strong", { text: "Question" }));
  }
  // Shown once settled, in place of the form: what was asked.
  q.asked = approval
    ? el("pre", { class: `json args${isEmpty(d.args) ? " no-args" : ""}`, "data-testid": "question-asked-args", text: json(d.args ?? {}, true), hidden: true })
    : null;

  q.fieldset = el("fieldset", { class: "question-fieldset" });
  q.form = el("form", { class: "question-form", "data-testid": "question-form", novalidate: true, "aria-labelledby": messageId }, q.fieldset);
  const actions = el("div", { class: "question-actions" });
  if (approval) {
    const text = JSON.stringify(d.args ?? {}, null, 2);
    q.args = el("textarea", { id: domId("q-args"), rows: Math.min(12, text.split("\n").length), spellcheck: "false", "data-testid": "question-args" });
    q.args.value = text;
    q.fieldset.append(el("div", { class: "question-field" },
      el("label", { for: q.args.id }, "Arguments ", el("span", { class: "muted", text: "(JSON: edit them to change the call)" })), q.args));
    actions.append(
      el("button", { type: "submit", class: "primary small-btn", "data-testid": "approve-button", text: "Approve" }),
      el("button", { type: "button", class: "danger small-btn", "data-testid": "deny-button", text: "Deny", onclick: () => deny(run, q) }));
  } else {
    q.plan = formFor(d.schema);
    if (q.plan.shape === "json") {
      q.json = el("textarea", { id: domId("q-json"), rows: 4, spellcheck: "false", "data-testid": "question-input", "data-kind": "json" });
      if (isPlainObject(d.schema) && d.schema.default !== undefined) q.json.value = json(d.schema.default, true);
      q.fieldset.append(el("div", { class: "question-field" },
        el("label", { for: q.json.id }, "Answer ", el("span", { class: "muted", text: "(JSON that fits the schema)" })), q.json),
      el("details", { class: "schema-details" }, el("summary", { text: "schema" }),
        el("pre", { class: "json args", "data-testid": "question-schema", text: json(d.schema, true) })));
    } else {
      for (const field of q.plan.fields) {
        const { control, node } = fieldControl(field, q.plan.shape === "value" ? messageId : null);
        q.controls.push({ field, control });
        q.fieldset.append(node);
      }
      if (q.plan.fields.some((f) => f.required && f.name !== null)) {
        actions.append(el("span", { class: "muted small", text: "* required" }));
      }
    }
    actions.prepend(el("button", { type: "submit", class: "primary small-btn", "data-testid": "question-submit", text: "Send answer" }));
  }
  actions.append(el("span", { class: "spacer" }), q.expires);
  q.fieldset.append(actions);
  q.form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (approval) approve(run, q);
    else sendInput(run, q);
  });

  q.card = el("li", {
    class: "question-card", "data-testid": "question-card", "data-interrupt-id": d.interrupt_id, "data-kind": q.kind,
    "data-tool": approval ? d.tool : undefined, "data-state": "open", role: "group", "aria-labelledby": messageId,
  },
  eventEl("div", e, "question-ask", icon(approval ? "⚑\uFE0E" : "?"),
    el("span", { class: "ev-body" }, title, q.message, q.asked)),
  q.form, q.error, q.note);
  showExpiry(q);
  run.questions.set(q.id, q);
  run.timeline.append(q.card);
  updateWaiting(run);

  const early = run.earlyAnswers.get(q.id);
  if (early) {
    run.earlyAnswers.delete(q.id);
    early.line.parentElement?.remove();
    settleQuestion(run, q, early.e);
  }
}

/** What became of a question, in words: "answered: …", "approved", "approved with args …",
 *  "denied" or "expired". `kind` is null when the question itself is not known. */
function settledText(d, kind) {
  if (d.expired) return "expired";
  const r = d.response;
  const looksLikeApproval = isPlainObject(r) && typeof r.approved === "boolean" &&
    Object.keys(r).every((k) => k === "approved" || k === "args");
  if (kind === "approval" || (kind === null && looksLikeApproval)) {
    if (!r?.approved) return "denied";
    return isPlainObject(r.args) ? `approved with args ${json(r.args)}` : "approved";
  }
  return `answered: ${typeof r === "string" ? r : json(r)}`;
}

/** The line of an `input_received`. */
function settledLine(e, q) {
  const d = e.data ?? {};
  const text = settledText(d, q ? q.kind : null);
  const outcome = d.expired ? "expired" : text.startsWith("denied") ? "denied" : "answered";
  const glyph = { expired: "⌛\uFE0E", denied: "✗", answered: "✓" }[outcome];
  return eventEl("div", e, `question-done is-${outcome}`,
    el("span", { class: "ev-body" }, el("span", { class: `question-outcome ${outcome === "answered" ? "ok" : outcome === "denied" ? "bad" : "muted"}`, text: `${glyph} ` }),
      el("span", { "data-testid": "question-settled", "data-outcome": outcome, text })));
}

/** Closes the card: no more answers from this tab; `line` says why. */
function closeQuestion(run, q, state, line) {
  q.state = state;
  q.card.dataset.state = state;
  q.form.remove();
  q.error.textContent = "";
  if (q.asked) q.asked.hidden = false;
  q.card.append(line);
  updateWaiting(run);
}

function settleQuestion(run, q, e) {
  if (q.state !== "open") return;
  const d = e.data ?? {};
  const state = d.expired ? "expired" : q.kind === "approval" ? (d.response?.approved ? "approved" : "denied") : "answered";
  closeQuestion(run, q, state, settledLine(e, q));
}

/** Questions still open when their run can no longer settle them (it ended without their
 *  `input_received`, or the server lost the history): close them as `state`. */
function retireQuestions(run, state, text) {
  for (const q of run.questions.values()) {
    if (q.state === "open") {
      closeQuestion(run, q, state, el("div", { class: "question-done muted" },
        el("span", { "data-testid": "question-settled", "data-outcome": state, text })));
    }
  }
}

function approve(run, q) {
  let args;
  try {
    args = JSON.parse(q.args.value);
  } catch (err) {
    return refuseLocally(q, `The arguments are not valid JSON: ${err.message}`, q.args);
  }
  if (!isPlainObject(args)) return refuseLocally(q, "The arguments must be a JSON object, as the tool takes them.", q.args);
  // Edited arguments replace the call's; unchanged ones are not sent back.
  const response = sameJson(args, q.data.args ?? {}) ? { approved: true } : { approved: true, args };
  return sendResponse(run, q, response);
}

function deny(run, q) {
  return sendResponse(run, q, { approved: false });
}

function sendInput(run, q) {
  if (q.json) {
    try {
      return sendResponse(run, q, JSON.parse(q.json.value));
    } catch (err) {
      return refuseLocally(q, `The answer is not valid JSON: ${err.message}`, q.json);
    }
  }
  let response = q.plan.shape === "object" ? {} : undefined;
  for (const { field, control } of q.controls) {
    const read = readField(field, control);
    if (read.problem) return refuseLocally(q, read.problem, control);
    if (!read.set) continue;
    if (field.name === null) response = read.value;
    else response[field.name] = read.value;
  }
  return sendResponse(run, q, response);
}

/** Shows what is wrong with an answer under the form, on `control` too when known. */
function refuseLocally(q, message, control = null) {
  q.error.textContent = message;
  markInvalid(q, control);
  control?.focus();
}

function markInvalid(q, control) {
  for (const c of q.form.querySelectorAll("[aria-invalid]")) c.removeAttribute("aria-invalid");
  if (control) {
    control.setAttribute("aria-invalid", "true");
    control.setAttribute("aria-errormessage", q.error.id);
  }
}

/** The control a schema refusal is about: the validator names it as a JSON pointer
 *  ("… at /copies: 0 is less than the minimum of 1") or as a missing property ("… schema:
 *  "recipient" is a required property"). */
function controlOfRefusal(q, message) {
  if (q.json) return q.json;
  if (q.args) return q.args;
  const at = / at \/([^/:\s]+)/.exec(message);
  const missing = /schema: "((?:[^"\\]|\\.)*)" is a required property/.exec(message);
  const name = at ? at[1].replace(/~1/g, "/").replace(/~0/g, "~") : missing ? missing[1] : null;
  const hit = q.controls.find(({ field }) => field.name !== null && field.name === name);
  return hit ? hit.control : q.controls.length === 1 ? q.controls[0].control : null;
}

async function sendResponse(run, q, response) {
  if (q.state !== "open") return;
  q.error.textContent = "";
  q.note.textContent = "";
  markInvalid(q, null);
  q.fieldset.disabled = true;
  q.card.dataset.sending = "true";
  try {
    await client.respond(run.id, q.id, response);
    // Taken: every tab (this one too) now gets input_received, which closes the card.
  } catch (err) {
    if (err.code === "interrupt_resolved") {
      // Answered in another tab first, or expired: its input_received closes the card.
      q.note.textContent = "Already settled: answered in another tab, or it expired.";
      return;
    }
    if (q.state !== "open") return;
    q.fieldset.disabled = false;
    if (err.code === "invalid_field") {
      // The answer does not fit: the question stays open for a better one.
      refuseLocally(q, err.message, controlOfRefusal(q, err.message));
    } else if (err.code === "connection_lost") {
      q.error.textContent = "The connection dropped before the server answered: if the question is still open, send it again.";
    } else {
      q.error.textContent = `${err.code ? `${err.code}: ` : ""}${err.message}`;
    }
  } finally {
    delete q.card.dataset.sending;
  }
}

function renderEvent(e) {
  const run = runs.get(e.run_id) ?? createRun(e);
  // Follow the run as it grows, unless the reader scrolled up in it.
  const tl = run.timeline;
  const atBottom = tl.scrollHeight - tl.scrollTop - tl.clientHeight < 24;
  renderInto(run, e);
  if (atBottom) tl.scrollTop = tl.scrollHeight;
}

function renderInto(run, e) {
  const d = e.data ?? {};
  if (e.type !== "partial_result") run.answer = null;
  switch (e.type) {
    case "agent_started": {
      const input = json(d.input);
      const body = el("span", { class: "ev-body" }, el("span", { text: "Started " }), el("strong", { text: d.agent }));
      if (input.length <= 48) {
        body.append(" with ", el("code", { class: "json", "data-testid": "run-input-value", text: input }));
      } else {
        const steps = Array.isArray(d.input?.steps) ? `${d.input.steps.length} steps`
          : typeof d.input === "string" ? `text, ${[...d.input].length} characters` : `${input.length} characters of JSON`;
        body.append(el("details", { class: "input-details" },
          el("summary", { text: `input: ${steps}` }),
          el("pre", { class: "json args", "data-testid": "run-input-value", text: json(d.input, true) })));
      }
      run.timeline.append(eventEl("li", e, "started", icon("▶"), body));
      break;
    }
    case "agent_thinking":
      run.timeline.append(eventEl("li", e, "thinking",
        icon("∴"),
        el("span", { class: "ev-body", "data-testid": "thinking-text", text: d.text })));
      break;
    case "partial_result": {
      if (!run.answer) {
        run.answer = el("div", { class: "answer-text", "data-testid": "answer" });
        run.timeline.append(el("li", { class: "answer" },
          icon("✎"), run.answer));
      }
      const piece = eventEl("span", e, "partial", d.text);
      run.answer.append(piece);
      break;
    }
    case "tool_executing": {
      const progress = el("progress", { max: 1, "data-testid": "tool-progress-bar" });
      // Until the tool reports progress, an indeterminate bar says it is running.
      const progressLabel = el("span", { class: "muted small", "data-testid": "tool-progress-message", text: "running…" });
      const progressLog = el("div", { class: "progress-log" });
      const progressSummary = el("summary", { text: "progress" });
      const progressDetails = el("details", { class: "progress-details" }, progressSummary, progressLog);
      const card = el("li", { class: "tool-card", "data-testid": "tool-card", "data-tool-call-id": d.tool_call_id, "data-tool": d.tool, "data-state": "running" },
        eventEl("div", e, "tool-call",
          icon("⚙\uFE0E"),
          el("span", { class: "ev-body" },
            el("strong", { class: "tool-name", "data-testid": "tool-name", text: d.tool }),
            el("span", { class: "muted small", text: ` ${d.tool_call_id}` }),
            el("pre", { class: `json args${isEmpty(d.args) ? " no-args" : ""}`, "data-testid": "tool-args", text: json(d.args ?? {}, true) }))),
        el("div", { class: "progress-row" }, progress, progressLabel),
        progressDetails);
      progressDetails.hidden = true;
      run.tools.set(d.tool_call_id, { card, progress, progressLabel, progressLog, progressSummary, progressDetails, count: 0 });
      run.timeline.append(card);
      break;
    }
    case "tool_progress": {
      const tool = run.tools.get(d.tool_call_id);
      const line = eventEl("div", e, "progress-line", el("span", { class: "ev-body", text: `${d.message ?? ""}${typeof d.fraction === "number" ? ` (${Math.round(d.fraction * 100)}%)` : ""}` }));
      if (!tool) {
        run.timeline.append(line);
        break;
      }
      tool.count++;
      tool.progressLog.append(line);
      tool.progressSummary.textContent = `${tool.count} progress update${tool.count === 1 ? "" : "s"}`;
      tool.progressDetails.hidden = false;
      if (typeof d.fraction === "number") tool.progress.value = d.fraction;
      else tool.progress.removeAttribute("value");
      tool.progressLabel.textContent = d.message ?? "";
      break;
    }
    case "tool_completed": {
      const tool = run.tools.get(d.tool_call_id);
      const outcome = d.ok
        ? el("span", { class: "ev-body" }, el("span", { class: "ok", text: "✓ result " }),
          el("code", { class: "json", "data-testid": "tool-result", text: json(d.result) }))
        : el("span", { class: "ev-body" }, el("span", { class: "bad", text: "✗ " }),
          el("span", { class: "tool-error", "data-testid": "tool-error", "data-code": d.error?.code, text: errorText(d.error) }));
      const line = eventEl("div", e, `tool-done ${d.ok ? "is-ok" : "is-error"}`, outcome,
        el("span", { class: "duration muted", "data-testid": "tool-duration", text: formatMs(d.duration_ms) }));
      if (!tool) {
        run.timeline.append(line);
        break;
      }
      tool.card.dataset.state = d.ok ? "ok" : "error";
      tool.card.append(line);
      if (tool.count === 0) tool.progress.parentElement.hidden = true;
      else if (d.ok) tool.progress.value = 1;
      break;
    }
    case "input_requested":
      renderQuestion(run, e);
      break;
    case "input_received": {
      const q = run.questions.get(d.interrupt_id);
      if (q) {
        settleQuestion(run, q, e);
      } else {
        // Its question has not arrived (yet): show the answer alone; renderQuestion takes it.
        const line = settledLine(e, null);
        run.timeline.append(el("li", { class: "question-orphan" }, line));
        run.earlyAnswers.set(d.interrupt_id, { e, line });
      }
      break;
    }
    case "agent_completed": {
      const status = d.status ?? "unknown";
      const body = el("span", { class: "ev-body" },
        el("strong", { text: `Run ${status.replace("_", " ")}` }),
        el("span", { class: "muted", text: ` in ${formatMs(d.duration_ms)}` }),
        d.usage ? el("span", { class: "muted", text: ` · ${d.usage.tool_calls ?? 0} tool call${d.usage.tool_calls === 1 ? "" : "s"}` }) : null);
      if (d.error) body.append(el("div", { class: "bad", "data-testid": "run-error-value", "data-code": d.error.code, text: errorText(d.error) }));
      if (d.result !== null && d.result !== undefined) {
        body.append(el("div", { class: "final-result" }, el("span", { class: "muted", text: "answer " }),
          el("span", { "data-testid": "run-result", text: typeof d.result === "string" ? d.result : json(d.result) })));
      }
      run.timeline.append(eventEl("li", e, `completed completed-${status}`,
        icon(status === "succeeded" ? "✓" : status === "failed" ? "✗" : "■"), body));
      run.elapsed.textContent = formatMs(d.duration_ms);
      // The server settles every open question before this event; a question still open here
      // lost its input_received (history the server no longer kept).
      retireQuestions(run, "closed", "closed: the run ended");
      setStatus(run, status);
      break;
    }
    default:
      run.timeline.append(eventEl("li", e, "other", el("span", { class: "ev-body" }, el("strong", { text: e.type }), " ", el("code", { text: json(d) }))));
  }
}

// While runs are going, show how long they have been, and how long their questions stay open.
setInterval(() => {
  for (const run of runs.values()) {
    if (run.done) continue;
    run.elapsed.textContent = formatMs(Date.now() - run.startedLocal);
    for (const q of run.questions.values()) if (q.state === "open") showExpiry(q);
  }
}, 250);

setupSignIn();
