// agentcast.js without a browser or a server: backoff, seq dedupe, gap detection, resume and
// commands, against a scripted fake WebSocket.

import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { AgentcastClient, AgentcastError, SeqTracker, backoffDelay } from "../../web/agentcast.js";

describe("backoffDelay", () => {
  const opts = { initialMs: 100, maxMs: 2000, factor: 2, jitter: 0.5 };

  test("grows exponentially and is capped", () => {
    const top = (attempt) => backoffDelay(attempt, opts, () => 0);
    assert.deepEqual([0, 1, 2, 3, 4, 5, 6, 10].map(top), [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
  });

  test("jitter takes off at most `jitter` of the delay", () => {
    assert.equal(backoffDelay(3, opts, () => 1), 400);
    assert.equal(backoffDelay(3, opts, () => 0.5), 600);
    for (let i = 0; i < 200; i++) {
      const d = backoffDelay(2, opts);
      assert.ok(d >= 200 && d <= 400, `delay ${d}`);
    }
    assert.equal(backoffDelay(2, { ...opts, jitter: 0 }, () => 0.9), 400);
  });

  test("has sane defaults", () => {
    const d = backoffDelay(0);
    assert.ok(d >= 125 && d <= 250, `first delay ${d}`);
    assert.ok(backoffDelay(100) <= 10_000);
  });
});

describe("SeqTracker", () => {
  test("accepts each seq once, in or out of order", () => {
    const t = new SeqTracker(0);
    const delivered = [1, 2, 2, 1, 5, 3, 5, 4, 6, 3].filter((s) => t.accept(s));
    assert.deepEqual(delivered, [1, 2, 5, 3, 4, 6]);
    assert.equal(t.contiguous, 6);
    assert.equal(t.ahead.size, 0);
  });

  test("starts after its base and reports what is missing", () => {
    const t = new SeqTracker(10);
    assert.equal(t.accept(10), false);
    assert.equal(t.accept(12), true);
    assert.equal(t.accept(14), true);
    assert.equal(t.contiguous, 10);
    assert.equal(t.hasGap(10), false);
    assert.equal(t.hasGap(12), true);
    assert.deepEqual(t.missing(15), [11, 13, 15]);
    t.accept(11);
    assert.equal(t.contiguous, 12);
    assert.deepEqual(t.missing(14), [13]);
  });

  test("skipTo gives up on a range and keeps what was seen after it", () => {
    const t = new SeqTracker(0);
    [1, 2, 6, 8].forEach((s) => t.accept(s));
    t.skipTo(5);
    assert.equal(t.contiguous, 6);
    assert.equal(t.accept(4), false);
    assert.equal(t.accept(7), true);
    assert.equal(t.contiguous, 8);
    t.skipTo(3);
    assert.equal(t.contiguous, 8);
  });

  test("refuses what is not a seq", () => {
    const t = new SeqTracker(0);
    assert.equal(t.accept("1"), false);
    assert.equal(t.accept(1.5), false);
    assert.equal(t.accept(undefined), false);
  });
});

// ---- a fake WebSocket and server ------------------------------------------------------------

function fakeNetwork() {
  const net = { sockets: [], waiters: [] };
  net.WebSocket = class FakeWebSocket {
    constructor(url) {
      this.url = new URL(url);
      this.readyState = 0;
      this.sent = [];
      net.sockets.push(this);
      const w = net.waiters.shift();
      if (w) w(this);
    }
    send(text) {
      assert.equal(this.readyState, 1, "send on a socket that is not open");
      this.sent.push(JSON.parse(text));
    }
    close(code, reason) {
      if (this.readyState === 3) return;
      this.readyState = 3;
      this.closedWith = code;
      setTimeout(() => this.onclose?.({ code, reason }), 0);
    }
    // The server's side:
    accept(welcome) {
      this.readyState = 1;
      this.onopen?.({});
      if (welcome) this.recv({ type: "welcome", session_id: "ses_x", user_id: "alice", protocol: 1, ...welcome });
    }
    recv(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }
    drop(code = 1006) {
      this.readyState = 3;
      this.onclose?.({ code, reason: "" });
    }
    query(name) {
      return this.url.searchParams.get(name);
    }
  };
  /** The next socket the client opens (or the last one, if it is already open and unused). */
  net.next = () =>
    new Promise((resolve) => {
      const fresh = net.sockets.find((s) => !s.taken);
      if (fresh) {
        fresh.taken = true;
        return resolve(fresh);
      }
      net.waiters.push((s) => {
        s.taken = true;
        resolve(s);
      });
    });
  return net;
}

function ev(seq, type = "partial_result", run = "run_a") {
  return { type, seq, run_id: run, thread_id: null, ts: "2026-01-01T00:00:00.000000Z", data: { text: `e${seq}` } };
}

function newClient(net, options = {}) {
  const client = new AgentcastClient({
    url: "ws://agentcast.test/v1/ws",
    token: "tok",
    WebSocket: net.WebSocket,
    backoff: { initialMs: 1, maxMs: 20, jitter: 0 },
    ...options,
  });
  const log = { events: [], resumed: [], gaps: [], resumeGaps: [], statuses: [], errors: [] };
  client.on("event", (e) => log.events.push(e.seq));
  client.on("resumed", (r) => log.resumed.push(r));
  client.on("gap", (g) => log.gaps.push(g));
  client.on("resume_gap", (g) => log.resumeGaps.push(g));
  client.on("status", (s) => log.statuses.push(s));
  client.on("error", (f) => log.errors.push(f));
  return { client, log };
}

const tick = () => new Promise((r) => setTimeout(r, 0));

describe("AgentcastClient", () => {
  test("connects with the token and starts live from welcome.last_seq", async () => {
    const net = fakeNetwork();
    const { client, log } = newClient(net);
    const connected = client.connect();
    const ws = await net.next();
    assert.equal(ws.query("token"), "tok");
    assert.equal(ws.query("after_seq"), null);
    ws.accept({ epoch: "E1", last_seq: 5 });
    const welcome = await connected;
    assert.equal(welcome.last_seq, 5);
    assert.equal(client.state, "open");
    assert.equal(client.userId, "alice");
    ws.recv(ev(4)); // from before this client: not delivered
    ws.recv(ev(6));
    ws.recv(ev(7));
    ws.recv(ev(7));
    assert.deepEqual(log.events, [6, 7]);
    assert.equal(client.lastSeq, 7);
    client.close();
  });

  test("with history, the first connection replays from 0", async () => {
    const net = fakeNetwork();
    const { client, log } = newClient(net, { history: true, token: async () => "fresh" });
    client.connect();
    const ws = await net.next();
    assert.equal(ws.query("after_seq"), "0");
    assert.equal(ws.query("epoch"), null);
    assert.equal(ws.query("token"), "fresh");
    ws.accept({ epoch: "E1", last_seq: 2 });
    ws.recv(ev(1, "agent_started"));
    ws.recv(ev(2));
    ws.recv({ type: "resumed", from_seq: 1, to_seq: 2 });
    assert.deepEqual(log.events, [1, 2]);
    assert.deepEqual(log.resumed.map((r) => [r.replayed, r.delivered, r.reconnect, r.source]), [[2, 2, false, "connect"]]);
    client.close();
  });

  test("reconnects with backoff, resumes after the last seq it saw, drops the duplicates", async () => {
    const net = fakeNetwork();
    const { client, log } = newClient(net);
    const byRun = [];
    client.onRun("run_a", (e) => byRun.push(e.seq));
    client.connect();
    const ws1 = await net.next();
    ws1.accept({ epoch: "E1", last_seq: 0 });
    [1, 2, 3].forEach((s) => ws1.recv(ev(s)));
    ws1.drop();
    assert.equal(client.state, "reconnecting");

    // Two failed attempts, then one that works.
    const ws2 = await net.next();
    assert.equal(ws2.query("after_seq"), "3");
    assert.equal(ws2.query("epoch"), "E1");
    ws2.drop();
    const ws3 = await net.next();
    ws3.drop();
    const ws4 = await net.next();
    assert.equal(ws4.query("after_seq"), "3");
    ws4.accept({ epoch: "E1", last_seq: 6 });
    // The server replays from after_seq; pretend it also re-sent 3 (as a replay after a
    // partly delivered frame could): the app sees it once.
    [3, 4, 5, 6].forEach((s) => ws4.recv(ev(s)));
    ws4.recv({ type: "resumed", from_seq: 4, to_seq: 6 });
    ws4.recv(ev(7));
    assert.deepEqual(log.events, [1, 2, 3, 4, 5, 6, 7]);
    assert.deepEqual(byRun, [1, 2, 3, 4, 5, 6, 7]);
    assert.deepEqual(log.resumed.map((r) => [r.replayed, r.delivered, r.reconnect]), [[3, 3, true]]);
    const delays = log.statuses.filter((s) => s.state === "reconnecting").map((s) => s.delayMs);
    assert.deepEqual(delays, [1, 2, 4]);
    assert.equal(client.state, "open");
    client.close();
  });

  test("a heartbeat ahead of what arrived triggers a reconnect that fills the gap", async () => {
    const net = fakeNetwork();
    const { client, log } = newClient(net);
    client.connect();
    const ws1 = await net.next();
    ws1.accept({ epoch: "E1", last_seq: 0 });
    ws1.recv(ev(1));
    ws1.recv(ev(3)); // 2 went missing
    ws1.recv({ type: "heartbeat", last_seq: 3 });
    assert.deepEqual(log.gaps, [{ from: 2, to: 3, action: "reconnect" }]);
    assert.equal(ws1.closedWith, 4000);
    const ws2 = await net.next();
    assert.equal(ws2.query("after_seq"), "1");
    ws2.accept({ epoch: "E1", last_seq: 3 });
    ws2.recv(ev(2));
    ws2.recv(ev(3));
    ws2.recv({ type: "resumed", from_seq: 2, to_seq: 3 });
    ws2.recv({ type: "heartbeat", last_seq: 3 });
    assert.deepEqual(log.events, [1, 3, 2]);
    assert.equal(log.gaps.length, 1);
    client.close();
  });

  test("a heartbeat showing missed events from before the connection sends resume", async () => {
    const net = fakeNetwork();
    const { client, log } = newClient(net);
    client.connect();
    const ws = await net.next();
    ws.accept({ epoch: "E1", last_seq: 4 });
    // Suppose this client lost track of 3 and 4 (they were before this connection).
    client.seqs.reset(2);
    ws.recv({ type: "heartbeat", last_seq: 4 });
    assert.deepEqual(log.gaps, [{ from: 3, to: 4, action: "resume" }]);
    const resume = ws.sent.at(-1);
    assert.equal(resume.type, "resume");
    assert.equal(resume.after_seq, 2);
    assert.equal(resume.epoch, "E1");
    // No second resume while one is under way.
    ws.recv({ type: "heartbeat", last_seq: 4 });
    assert.equal(ws.sent.length, 1);
    ws.recv(ev(3));
    ws.recv(ev(4));
    ws.recv({ type: "resumed", from_seq: 3, to_seq: 4 });
    assert.deepEqual(log.events, [3, 4]);
    assert.equal(log.resumed[0].source, "command");
    client.close();
  });

  test("resume_gap at reconnect: says what was lost, recovers what is still kept", async () => {
    const net = fakeNetwork();
    const { client, log } = newClient(net);
    client.connect();
    const ws1 = await net.next();
    ws1.accept({ epoch: "E1", last_seq: 0 });
    [1, 2].forEach((s) => ws1.recv(ev(s)));
    ws1.drop();
    const ws2 = await net.next();
    ws2.accept({ epoch: "E1", last_seq: 10 });
    ws2.recv({ type: "error", code: "resume_gap", message: "gone", oldest_seq: 6, last_seq: 10 });
    assert.deepEqual(log.resumeGaps.map((g) => [g.lost_from, g.lost_to, g.epochChanged, g.reconnect]), [[3, 5, false, true]]);
    const resume = ws2.sent.at(-1);
    assert.deepEqual([resume.type, resume.after_seq, resume.epoch], ["resume", 5, "E1"]);
    ws2.recv(ev(11)); // live events may come first
    [6, 7, 8, 9, 10].forEach((s) => ws2.recv(ev(s)));
    ws2.recv({ type: "resumed", from_seq: 6, to_seq: 10 });
    ws2.recv({ type: "heartbeat", last_seq: 11 });
    assert.deepEqual(log.events, [1, 2, 11, 6, 7, 8, 9, 10]);
    assert.equal(client.lastSeq, 11);
    assert.equal(log.gaps.length, 0);
    client.close();
  });

  test("a new epoch (server restart) starts the numbering again", async () => {
    const net = fakeNetwork();
    const { client, log } = newClient(net);
    const welcomes = [];
    client.on("welcome", (w) => welcomes.push(w));
    client.connect();
    const ws1 = await net.next();
    ws1.accept({ epoch: "E1", last_seq: 0 });
    [1, 2, 3].forEach((s) => ws1.recv(ev(s)));
    ws1.drop(1001);
    const ws2 = await net.next();
    assert.equal(ws2.query("epoch"), "E1");
    ws2.accept({ epoch: "E2", last_seq: 2 });
    assert.equal(welcomes.at(-1).epochChanged, true);
    ws2.recv({ type: "error", code: "resume_gap", message: "new epoch", oldest_seq: 1, last_seq: 2 });
    assert.equal(log.resumeGaps[0].epochChanged, true);
    assert.equal(log.resumeGaps[0].lost_from, null);
    const resume = ws2.sent.at(-1);
    assert.deepEqual([resume.after_seq, resume.epoch], [0, "E2"]);
    ws2.recv(ev(1, "agent_started", "run_b"));
    ws2.recv(ev(2, "partial_result", "run_b"));
    ws2.recv({ type: "resumed", from_seq: 1, to_seq: 2 });
    ws2.recv(ev(3, "agent_completed", "run_b"));
    // 1, 2, 3 again, of the new history.
    assert.deepEqual(log.events, [1, 2, 3, 1, 2, 3]);
    assert.equal(client.epoch, "E2");
    client.close();
  });

  test("commands resolve on ack, reject on error and on a lost connection", async () => {
    const net = fakeNetwork();
    const { client, log } = newClient(net);
    const started = client.start("echo", "hi", { threadId: "th_1" }); // sent once connected
    client.connect();
    const ws = await net.next();
    ws.accept({ epoch: "E1", last_seq: 0 });
    await tick();
    const frame = ws.sent[0];
    assert.deepEqual({ ...frame, request_id: undefined }, { type: "start_run", agent: "echo", input: "hi", thread_id: "th_1", request_id: undefined });
    ws.recv({ type: "ack", request_id: frame.request_id, run_id: "run_1" });
    assert.equal(await started, "run_1");

    const cancelled = client.cancel("run_nope");
    await tick();
    ws.recv({ type: "error", request_id: ws.sent[1].request_id, code: "run_not_found", message: "no such run" });
    await assert.rejects(cancelled, (e) => e instanceof AgentcastError && e.code === "run_not_found");

    // An error that answers nothing of ours goes to on("error").
    ws.recv({ type: "error", code: "bad_json", message: "?" });
    assert.equal(log.errors[0].code, "bad_json");

    const pinged = client.ping();
    await tick();
    ws.drop();
    await assert.rejects(pinged, (e) => e.code === "connection_lost");

    client.close();
    await assert.rejects(client.start("echo", "x"), (e) => e.code === "closed");
  });

  test("respond sends the answer, resolves on ack, rejects with the server's code and message", async () => {
    const net = fakeNetwork();
    const { client } = newClient(net);
    client.connect();
    const ws = await net.next();
    ws.accept({ epoch: "E1", last_seq: 0 });
    await tick();

    const approved = client.respond("run_1", "in_1", { approved: true, args: { expr: "7*8" } });
    await tick();
    const frame = ws.sent[0];
    assert.deepEqual({ ...frame, request_id: undefined }, {
      type: "respond", run_id: "run_1", interrupt_id: "in_1", response: { approved: true, args: { expr: "7*8" } }, request_id: undefined,
    });
    ws.recv({ type: "ack", request_id: frame.request_id });
    assert.equal(await approved, undefined);

    const refusals = [
      ["invalid_field", "the response does not fit the question's schema at /n: 0 is less than the minimum of 1"],
      ["interrupt_resolved", "the question was already settled (answered, or expired)"],
      ["run_not_found", "no such run"],
    ];
    for (const [code, message] of refusals) {
      const answer = client.respond("run_1", "in_2", { n: 0 });
      await tick();
      const sent = ws.sent.at(-1);
      assert.equal(sent.type, "respond");
      ws.recv({ type: "error", request_id: sent.request_id, code, message });
      await assert.rejects(answer, (e) => e instanceof AgentcastError && e.code === code && e.message === message && e.frame.code === code);
    }
    // A falsy answer is still an answer.
    const zero = client.respond("run_1", "in_3", 0);
    await tick();
    assert.equal(ws.sent.at(-1).response, 0);
    assert.ok("response" in ws.sent.at(-1));
    ws.recv({ type: "ack", request_id: ws.sent.at(-1).request_id });
    await zero;
    client.close();
  });

  test("a command with no answer times out", async () => {
    const net = fakeNetwork();
    const { client } = newClient(net, { commandTimeoutMs: 30 });
    client.connect();
    const ws = await net.next();
    ws.accept({ epoch: "E1", last_seq: 0 });
    await assert.rejects(client.ping(), (e) => e.code === "timeout");
    client.close();
  });

  test("a connection with no frame for staleAfterMs is given up and replaced", async () => {
    const net = fakeNetwork();
    const { client } = newClient(net, { staleAfterMs: 30 });
    client.connect();
    const ws1 = await net.next();
    ws1.accept({ epoch: "E1", last_seq: 0 });
    const ws2 = await net.next();
    assert.equal(ws1.closedWith, 4001);
    assert.equal(ws2.query("after_seq"), "0");
    client.close();
  });

  test("close() stops reconnecting", async () => {
    const net = fakeNetwork();
    const { client, log } = newClient(net);
    client.connect();
    const ws = await net.next();
    ws.accept({ epoch: "E1", last_seq: 0 });
    client.close();
    assert.equal(ws.closedWith, 1000);
    await new Promise((r) => setTimeout(r, 20));
    assert.equal(net.sockets.length, 1);
    assert.equal(log.statuses.at(-1).state, "closed");
  });

  test("a listener that throws does not stop delivery", async () => {
    const net = fakeNetwork();
    const reported = [];
    const { client, log } = newClient(net, { onListenerError: (e) => reported.push(e.message) });
    const seen = [];
    client.on("event", () => {
      throw new Error("app bug");
    });
    client.on("event", (e) => seen.push(e.seq));
    client.connect();
    const ws = await net.next();
    ws.accept({ epoch: "E1", last_seq: 0 });
    ws.recv(ev(1));
    ws.recv(ev(2));
    assert.deepEqual(seen, [1, 2]);
    assert.deepEqual(log.events, [1, 2]);
    assert.deepEqual(reported, ["app bug", "app bug"]);
    client.close();
  });
});
