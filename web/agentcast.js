// agentcast.js: a dependency-free client for the agentcast wire protocol, version 1
// (PROTOCOL.md). Works in browsers and in any runtime with a WebSocket class.
//
//   import { AgentcastClient } from "/agentcast.js";
//   const client = new AgentcastClient({ url: "ws://127.0.0.1:8080/v1/ws", token });
//   client.on("event", (e) => console.log(e.seq, e.type, e.data));
//   await client.connect();
//   const runId = await client.start("echo", "hello");
//   // answering a run's question (an `input_requested` event e), e.g. an approval:
//   await client.respond(e.run_id, e.data.interrupt_id, { approved: true });
//
// What it does for you: reconnects with exponential backoff and jitter; resumes from the last
// `seq` it saw (`?after_seq=&epoch=`) so nothing is lost; tells you when something was lost
// for good (`resume_gap`); notices gaps from `heartbeat.last_seq` and fills them; and delivers
// each run event exactly once, whatever the server replays. See docs/client.md.

export const PROTOCOL_VERSION = 1;

/** The run event types of PROTOCOL.md section 2, in the order a run can produce them, and
 *  section 12's questions to the user (`input_requested`, then `input_received`). */
export const RUN_EVENT_TYPES = Object.freeze([
  "agent_started",
  "agent_thinking",
  "partial_result",
  "input_requested",
  "input_received",
  "tool_executing",
  "tool_progress",
  "tool_completed",
  "agent_completed",
]);

/** A command the server refused (an `error` frame), or one that could not be delivered. */
export class AgentcastError extends Error {
  /**
   * @param {string} code the protocol error code (`unknown_agent`, `run_not_found`, ...) or one
   *   of the client's own: `connection_lost`, `timeout`, `closed`.
   * @param {string} message
   * @param {object} [frame] the whole `error` frame, when there was one
   */
  constructor(code, message, frame) {
    super(message);
    this.name = "AgentcastError";
    this.code = code;
    this.frame = frame ?? null;
  }
}

/**
 * How long to wait before reconnect attempt number `attempt` (0 for the first retry):
 * exponential backoff capped at `maxMs`, with "equal jitter": a random delay in
 * [base * (1 - jitter), base], so that many clients cut off at once do not come back at once.
 */
export function backoffDelay(attempt, options = {}, random = Math.random) {
  const { initialMs = 250, maxMs = 10_000, factor = 2, jitter = 0.5 } = options;
  const base = Math.min(maxMs, initialMs * Math.pow(factor, Math.max(0, attempt)));
  return Math.round(base * (1 - jitter * random()));
}

/**
 * Which sequence numbers have been delivered: every seq up to `contiguous`, plus the seqs in
 * `ahead` (seen out of order, e.g. live events that overtook a replay). Dedupe is `accept`;
 * a gap is `contiguous < some seq the server says it sent`.
 */
export class SeqTracker {
  constructor(start = 0) {
    this.reset(start);
  }

  /** Forget everything: seqs up to `start` count as seen. */
  reset(start = 0) {
    this.contiguous = start;
    this.ahead = new Set();
    this.highest = start;
  }

  /** Records `seq`; true if it is new (deliver it), false if it was already seen (drop it). */
  accept(seq) {
    if (!Number.isSafeInteger(seq) || seq <= this.contiguous || this.ahead.has(seq)) {
      return false;
    }
    if (seq > this.highest) this.highest = seq;
    if (seq === this.contiguous + 1) {
      this.contiguous = seq;
      this.compact();
    } else {
      this.ahead.add(seq);
    }
    return true;
  }

  /** Gives up on every seq up to `seq`: they will not be delivered (e.g. after a resume_gap). */
  skipTo(seq) {
    if (seq <= this.contiguous) return;
    this.contiguous = seq;
    for (const s of this.ahead) if (s <= seq) this.ahead.delete(s);
    if (seq > this.highest) this.highest = seq;
    this.compact();
  }

  /** True if some seq in (contiguous, upto] has not been seen. */
  hasGap(upto) {
    return upto > this.contiguous;
  }

  /** The seqs in (contiguous, upto] not seen yet, at most `limit` of them. */
  missing(upto, limit = 1000) {
    const out = [];
    for (let s = this.contiguous + 1; s <= upto && out.length < limit; s++) {
      if (!this.ahead.has(s)) out.push(s);
    }
    return out;
  }

  compact() {
    while (this.ahead.delete(this.contiguous + 1)) this.contiguous++;
  }
}

const DEFAULTS = {
  history: false,
  backoff: { initialMs: 250, maxMs: 10_000, factor: 2, jitter: 0.5 },
  stableAfterMs: 5_000,
  staleAfterMs: 35_000,
  commandTimeoutMs: 15_000,
};

/**
 * One user's connection to agentcast, kept alive across network trouble.
 *
 * Options:
 * - `url`: the WebSocket URL, e.g. `ws://127.0.0.1:8080/v1/ws` (required)
 * - `token`: a string, or a function returning one (or a promise of one), called before every
 *   connection attempt so an app can refresh an expiring token
 * - `history`: on the first connection, also replay the user's buffered events (runs started
 *   before this client existed, in another tab or a previous page load). Default false: start
 *   live from `welcome.last_seq`.
 * - `backoff`: `{initialMs, maxMs, factor, jitter}` for reconnects (see `backoffDelay`)
 * - `stableAfterMs`: a connection that lived this long resets the backoff
 * - `staleAfterMs`: no frame at all for this long (the server sends a heartbeat every 10 s by
 *   default) means the connection is dead even if the socket does not know it yet: reconnect
 * - `commandTimeoutMs`: a command with no answer by then rejects with code `timeout`
 * - `WebSocket`: the WebSocket class to use (default `globalThis.WebSocket`)
 * - `onListenerError(error)`: what to do when a listener throws (default: report it as an
 *   uncaught error, after which delivery goes on)
 */
export class AgentcastClient {
  constructor(options) {
    if (!options || !options.url) throw new TypeError("AgentcastClient needs {url, token}");
    this.url = String(options.url);
    this._token = options.token;
    this.options = {
      ...DEFAULTS,
      ...options,
      backoff: { ...DEFAULTS.backoff, ...(options.backoff || {}) },
    };
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    this._listeners = new Map();
    this._runListeners = new Map();
    this.seqs = new SeqTracker(0);
    /** `idle`, `connecting`, `open`, `reconnecting` or `closed`. */
    this.state = "idle";
    this.epoch = null;
    this.userId = null;
    this.sessionId = null;
    this.attempt = 0;
    this._conn = null;
    this._everConnected = false;
    this._pending = new Map();
    this._nextRequest = 1;
    this._retryTimer = null;
    this._waitingForOpen = new Set();
  }

  /** The highest seq such that every event up to it has been delivered. */
  get lastSeq() {
    return this.seqs.contiguous;
  }

  // ---- listening ----------------------------------------------------------------------------

  /**
   * Listens to `name`; returns a function that stops listening. Names:
   * - `event` (every run event, exactly once, in the order received)
   * - `status` `{state, attempt, delayMs?}` whenever `state` changes
   * - `welcome` `{session_id, user_id, epoch, last_seq, reconnect, epochChanged}`
   * - `resumed` `{from_seq, to_seq, replayed, delivered, reconnect, source}`: a replay finished;
   *   `replayed` events were sent by the server, `delivered` of them were new to this client
   * - `resume_gap` `{after_seq, oldest_seq, last_seq, lost_from, lost_to, epochChanged, message}`:
   *   events were lost for good (`lost_from..lost_to`, or all history when `epochChanged`)
   * - `gap` `{from, to, action}`: a heartbeat showed events this client missed; it is fixing it
   * - `error` an `error` frame not answering one of this client's commands
   * - `close` `{code, reason, willReconnect}` whenever a socket closes
   */
  on(name, fn) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(fn);
    return () => this._listeners.get(name)?.delete(fn);
  }

  /** Listens to the events of one run; returns a function that stops listening. */
  onRun(runId, fn) {
    if (!this._runListeners.has(runId)) this._runListeners.set(runId, new Set());
    this._runListeners.get(runId).add(fn);
    return () => {
      const set = this._runListeners.get(runId);
      if (set) {
        set.delete(fn);
        if (set.size === 0) this._runListeners.delete(runId);
      }
    };
  }

  _call(fn, value) {
    try {
      fn(value);
    } catch (e) {
      (this.options.onListenerError || reportListenerError)(e);
    }
  }

  _emit(name, value) {
    const set = this._listeners.get(name);
    if (!set) return;
    for (const fn of [...set]) this._call(fn, value);
  }

  // ---- commands -----------------------------------------------------------------------------

  /** Opens the connection; resolves with the first `welcome` (rejects with `closed` if
   *  `close()` comes first). Reconnects on its own after. */
  connect() {
    if (this.state === "closed") return Promise.reject(new AgentcastError("closed", "client closed"));
    const opened = this._whenOpen(Infinity);
    if (this.state === "idle") {
      this._setState("connecting");
      this._open();
    }
    return opened;
  }

  /** Closes for good: no more reconnects; pending commands reject with code `closed`. */
  close() {
    this._setState("closed");
    clearTimeout(this._retryTimer);
    this._failPending("closed", "client closed");
    if (this._conn) this._conn.shutdown(1000, "client closed");
    this._conn = null;
    for (const w of [...this._waitingForOpen]) w.reject(new AgentcastError("closed", "client closed"));
  }

  /**
   * Starts a run; resolves with its `run_id` once the server acked it. The run's events come
   * through `on("event")` and `onRun(runId)`; the ack precedes the first of them.
   * If the connection drops before the ack the promise rejects with `connection_lost`: the run
   * may or may not have started (its events, if any, still arrive after the reconnect).
   */
  async start(agent, input, { threadId } = {}) {
    const frame = { type: "start_run", agent, input };
    if (threadId != null) frame.thread_id = threadId;
    const ack = await this._command(frame);
    return ack.run_id;
  }

  /** Cancels a run; resolves once the server accepted (the run then ends `cancelled`). */
  async cancel(runId) {
    await this._command({ type: "cancel_run", run_id: runId });
  }

  /**
   * Answers a run's question (an `input_requested` event, PROTOCOL.md section 12); resolves once
   * the server took the answer. Every tab of the user then gets `input_received` (this one
   * too, and not necessarily after the ack). For `kind: "approval"` the response is
   * `{approved: true|false, args?: {...}}` (`args` replaces the tool's arguments); for `input`,
   * a value that fits the question's `schema`. Rejects with an `AgentcastError`:
   * `invalid_field` (the answer does not fit; the message says why and the question stays
   * open), `interrupt_resolved` (another answer came first, or the question expired),
   * `run_not_found`, or the client's own `connection_lost` (the answer may or may not have
   * been taken: the `input_received` that follows tells), `timeout`, `closed`.
   */
  async respond(runId, interruptId, response) {
    await this._command({ type: "respond", run_id: runId, interrupt_id: interruptId, response });
  }

  /** Round trip to the server; resolves with the time it took in milliseconds. */
  async ping() {
    const t0 = Date.now();
    await this._command({ type: "ping" });
    return Date.now() - t0;
  }

  _command(frame) {
    const request_id = `c${this._nextRequest++}`;
    const timeoutMs = this.options.commandTimeoutMs;
    const started = Date.now();
    return this._whenOpen(timeoutMs).then(
      () =>
        new Promise((resolve, reject) => {
          if (this.state !== "open" || !this._conn) {
            // The connection went away between its welcome and this command.
            reject(new AgentcastError("connection_lost", "connection closed"));
            return;
          }
          const left = Math.max(1, timeoutMs - (Date.now() - started));
          const timer = setTimeout(() => {
            this._pending.delete(request_id);
            reject(new AgentcastError("timeout", `no answer to ${frame.type} in ${timeoutMs} ms`));
          }, left);
          this._pending.set(request_id, { resolve, reject, timer, type: frame.type });
          this._conn.send({ ...frame, request_id });
        }),
    );
  }

  _whenOpen(timeoutMs) {
    if (this.state === "open") return Promise.resolve(this._conn.welcome);
    if (this.state === "closed") return Promise.reject(new AgentcastError("closed", "client closed"));
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject, timer: null };
      if (Number.isFinite(timeoutMs)) {
        waiter.timer = setTimeout(() => {
          this._waitingForOpen.delete(waiter);
          reject(new AgentcastError("timeout", `not connected after ${timeoutMs} ms`));
        }, timeoutMs);
      }
      this._waitingForOpen.add(waiter);
    });
  }

  _failPending(code, message) {
    for (const [id, p] of this._pending) {
      clearTimeout(p.timer);
      p.reject(new AgentcastError(code, message));
      this._pending.delete(id);
    }
  }

  _setState(state, { force = false, ...extra } = {}) {
    if (this.state === state && !force) return;
    this.state = state;
    this._emit("status", { state, attempt: this.attempt, ...extra });
  }

  // ---- the connection -----------------------------------------------------------------------

  async _open() {
    let token;
    try {
      token = typeof this._token === "function" ? await this._token() : this._token;
    } catch (e) {
      if (this.state === "closed") return undefined;
      this._call(() => {
        throw e;
      });
      return this._scheduleReconnect();
    }
    if (this.state === "closed") return;
    const url = new URL(this.url);
    url.searchParams.set("token", token);
    let afterSeq = null;
    if (this.epoch !== null) {
      // A reconnect: from the last seq before which nothing is missing.
      afterSeq = this.seqs.contiguous;
      url.searchParams.set("after_seq", String(afterSeq));
      url.searchParams.set("epoch", this.epoch);
    } else if (this.options.history) {
      afterSeq = 0;
      url.searchParams.set("after_seq", "0");
    }
    this._conn = new Connection(this, url.toString(), afterSeq);
  }

  _scheduleReconnect(delayMs) {
    if (this.state === "closed") return;
    const delay = delayMs ?? backoffDelay(this.attempt, this.options.backoff);
    this.attempt++;
    this._setState("reconnecting", { delayMs: delay, force: true });
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => {
      if (this.state === "closed") return;
      this._open();
    }, delay);
  }

  /** Called by a Connection when its socket is gone. */
  _lost(conn, code, reason) {
    if (conn !== this._conn) return;
    this._conn = null;
    this._failPending("connection_lost", `connection closed (${code}${reason ? ` ${reason}` : ""})`);
    const willReconnect = this.state !== "closed";
    this._emit("close", { code, reason, willReconnect });
    if (!willReconnect) return;
    if (conn.welcome && Date.now() - conn.openedAt >= this.options.stableAfterMs) this.attempt = 0;
    this._scheduleReconnect(conn.reconnectNow ? 0 : undefined);
  }

  /** Called by a Connection on `welcome`. */
  _welcomed(conn, w) {
    const epochChanged = this.epoch !== null && w.epoch !== this.epoch;
    const reconnect = this._everConnected;
    this._everConnected = true;
    conn.reconnect = reconnect;
    conn.epochChanged = epochChanged;
    this.userId = w.user_id;
    this.sessionId = w.session_id;
    if (conn.afterSeq === null) {
      // Live from welcome.last_seq: earlier events are history this client does not want.
      this.seqs.reset(w.last_seq);
      conn.coveredFrom = w.last_seq;
    } else {
      // A replay (or a resume_gap) follows; commands can be sent meanwhile.
      conn.replaying = true;
      conn.coveredFrom = w.last_seq;
    }
    this.epoch = w.epoch;
    this._setState("open");
    for (const waiter of [...this._waitingForOpen]) {
      clearTimeout(waiter.timer);
      this._waitingForOpen.delete(waiter);
      waiter.resolve(w);
    }
    this._emit("welcome", { ...w, reconnect, epochChanged });
  }

  _runEvent(conn, e) {
    if (!this.seqs.accept(e.seq)) return;
    conn.delivered++;
    this._emit("event", e);
    const set = this._runListeners.get(e.run_id);
    if (set) for (const fn of [...set]) this._call(fn, e);
  }

  _control(conn, f) {
    switch (f.type) {
      case "welcome":
        return this._welcomed(conn, f);
      case "resumed":
        return this._resumed(conn, f);
      case "heartbeat":
        return this._heartbeat(conn, f);
      case "ack":
      case "pong":
        return this._answer(f, null);
      case "error":
        if (f.code === "resume_gap") return this._resumeGap(conn, f);
        if (f.request_id && this._pending.has(f.request_id)) {
          return this._answer(f, new AgentcastError(f.code, f.message, f));
        }
        return this._emit("error", f);
      default:
        // A newer server's frame: ignore it.
        return undefined;
    }
  }

  _answer(f, error) {
    const p = f.request_id && this._pending.get(f.request_id);
    if (!p) return;
    this._pending.delete(f.request_id);
    clearTimeout(p.timer);
    if (error) p.reject(error);
    else p.resolve(f);
  }

  _resumed(conn, f) {
    const replayed = Math.max(0, f.to_seq - f.from_seq + 1);
    let source;
    if (conn.replaying) {
      source = "connect";
      conn.replaying = false;
      conn.coveredFrom = conn.afterSeq;
    } else {
      source = "command";
      const asked = conn.resumes.shift();
      if (asked) conn.coveredFrom = Math.min(conn.coveredFrom, asked.afterSeq);
    }
    const delivered = conn.delivered - conn.deliveredMark;
    conn.deliveredMark = conn.delivered;
    this._emit("resumed", {
      from_seq: f.from_seq,
      to_seq: f.to_seq,
      replayed,
      delivered,
      reconnect: conn.reconnect,
      source,
    });
  }

  _resumeGap(conn, f) {
    let afterSeq;
    let upto;
    let source = "command";
    if (conn.replaying && !f.request_id) {
      source = "connect";
      conn.replaying = false;
      afterSeq = conn.afterSeq;
      upto = conn.welcome.last_seq;
    } else {
      const asked = conn.resumes.shift();
      if (!asked) return this._emit("error", f);
      afterSeq = asked.afterSeq;
      upto = asked.upto;
    }
    const epochChanged = source === "connect" && conn.epochChanged;
    const oldest = f.oldest_seq ?? upto + 1;
    const last = f.last_seq ?? upto;
    // The seq numbers this client knew no longer hold (a new history, or one shorter than what
    // was seen): start again from this history's beginning.
    const restart = epochChanged || afterSeq > last;
    if (restart) this.seqs.reset(0);
    const lostFrom = restart ? null : afterSeq + 1;
    const lostTo = lostFrom === null ? null : Math.min(oldest - 1, upto);
    this.seqs.skipTo(Math.min(oldest - 1, upto));
    this._emit("resume_gap", {
      after_seq: afterSeq,
      oldest_seq: oldest,
      last_seq: last,
      lost_from: lostFrom,
      lost_to: lostTo,
      epochChanged,
      reconnect: conn.reconnect,
      source,
      message: f.message,
    });
    // What is still buffered from before this connection, ask for it once.
    const from = this.seqs.contiguous;
    if (from < upto && !conn.recovering) {
      conn.recovering = true;
      this._resume(conn, from, upto);
    } else {
      this.seqs.skipTo(upto);
    }
    return undefined;
  }

  _heartbeat(conn, f) {
    if (conn.replaying || conn.resumes.length > 0) return;
    const sent = f.last_seq;
    if (!this.seqs.hasGap(sent)) return;
    const from = this.seqs.contiguous + 1;
    if (this.seqs.contiguous < conn.coveredFrom) {
      // Missing events from before this connection: the resume command replays them.
      this._emit("gap", { from, to: sent, action: "resume" });
      this._resume(conn, this.seqs.contiguous, conn.coveredFrom);
    } else {
      // This connection skipped events it should have sent: reconnect and resume.
      this._emit("gap", { from, to: sent, action: "reconnect" });
      conn.reconnectNow = true;
      conn.shutdown(4000, "gap");
    }
  }

  _resume(conn, afterSeq, upto) {
    conn.resumes.push({ afterSeq, upto });
    conn.send({ type: "resume", after_seq: afterSeq, epoch: this.epoch, request_id: `resume${this._nextRequest++}` });
  }
}

/** One WebSocket and what is known about it. */
class Connection {
  constructor(client, url, afterSeq) {
    this.client = client;
    this.afterSeq = afterSeq;
    this.welcome = null;
    this.openedAt = 0;
    this.replaying = false;
    this.recovering = false;
    this.coveredFrom = 0;
    this.resumes = [];
    this.delivered = 0;
    this.deliveredMark = 0;
    this.reconnectNow = false;
    this.reconnect = false;
    this.epochChanged = false;
    this.closed = false;
    this.staleTimer = null;
    const ws = new client._WebSocket(url);
    this.ws = ws;
    // Also bounds how long connecting may take.
    this.touch();
    ws.onopen = () => {
      this.openedAt = Date.now();
      this.touch();
    };
    ws.onmessage = (msg) => this.onMessage(msg);
    ws.onclose = (ev) => this.gone(ev.code, ev.reason);
    // An error is always followed by a close; the close decides.
    ws.onerror = () => {};
  }

  touch() {
    clearTimeout(this.staleTimer);
    const ms = this.client.options.staleAfterMs;
    if (ms && Number.isFinite(ms)) {
      this.staleTimer = setTimeout(() => this.shutdown(4001, "stale"), ms);
    }
  }

  onMessage(msg) {
    if (this.closed) return;
    this.touch();
    if (typeof msg.data !== "string") return;
    let f;
    try {
      f = JSON.parse(msg.data);
    } catch {
      return;
    }
    if (!f || typeof f !== "object") return;
    if (typeof f.seq === "number" && typeof f.run_id === "string") {
      this.client._runEvent(this, f);
    } else if (f.type === "welcome") {
      this.welcome = f;
      this.client._control(this, f);
    } else if (this.welcome) {
      this.client._control(this, f);
    }
  }

  send(frame) {
    if (this.closed || this.ws.readyState !== 1) return;
    this.ws.send(JSON.stringify(frame));
  }

  /** Closes the socket and reports it lost at once (without waiting for the close handshake). */
  shutdown(code, reason) {
    if (this.closed) return;
    try {
      this.ws.close(code, reason);
    } catch {
      // already closing
    }
    this.gone(code, reason);
  }

  gone(code, reason) {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.staleTimer);
    this.ws.onmessage = null;
    this.client._lost(this, code, reason);
  }
}

/** A listener's bug must not break the client: by default it is reported like an uncaught
 *  error (window.onerror, the console) after the listener returned. */
function reportListenerError(e) {
  if (typeof globalThis.reportError === "function") {
    globalThis.reportError(e);
  } else {
    setTimeout(() => {
      throw e;
    }, 0);
  }
}
