// The page reconnects when its connection is cut and resumes with every event exactly once.
// The page is loaded through a TCP proxy (helpers.startProxy) that the test can cut.

import assert from "node:assert/strict";
import { browserTest, eventsOf, isOneToN, runSel, sel, signIn, startProxy, startRun, startServer, waitDone } from "./helpers.mjs";

// Chromium logs a console error for each refused connection attempt (the WebSocket, and the
// page's token check after a few failed attempts): expected here.
const WS_REFUSED = /WebSocket connection to .* failed|Failed to load resource: net::ERR_/;

/** Records every connection state the page goes through in window.__states. */
function recordStates(page) {
  return page.evaluate(() => {
    const box = document.querySelector('[data-testid="connection-status"]');
    window.__states = [box.dataset.state];
    new MutationObserver(() => {
      if (window.__states.at(-1) !== box.dataset.state) window.__states.push(box.dataset.state);
    }).observe(box, { attributes: true, attributeFilter: ["data-state"] });
  });
}

browserTest("after the connection is cut the page reconnects and resumes: no event missing or doubled", async ({ server, page, defer }) => {
  const proxy = await startProxy(server.port);
  defer(() => proxy.close());
  const p = await page(undefined, { ignore: WS_REFUSED });
  const sockets = [];
  p.on("websocket", (ws) => sockets.push(new URL(ws.url()).searchParams));
  await signIn(p, proxy.url, "alice");
  await recordStates(p);

  const steps = [{ think: "a long, chatty run" }];
  for (let i = 1; i <= 25; i++) {
    steps.push({ text: `p${i} ` }, { sleep_ms: 60 });
    if (i === 10) steps.push({ tool: "sleep", args: { ms: 500 } });
  }
  const runId = await startRun(p, "scripted", { steps });

  // While it streams, cut every connection and refuse new ones for a moment, so that events
  // are emitted while the page is away and a reconnect attempt or two fail.
  await p.waitForFunction((sel) => document.querySelectorAll(sel).length >= 6, `${runSel(runId)} [data-testid="event"]`);
  proxy.refuseFor(700);
  const cut = proxy.cut();
  assert.ok(cut >= 2, `cut ${cut} sockets`);

  const notice = await p.waitForSelector(sel("reconnect-notice"), { timeout: 15_000 });
  assert.equal(await waitDone(p, runId), "succeeded");
  assert.equal(await p.getAttribute(sel("connection-status"), "data-state"), "open");

  const events = await eventsOf(p, runId);
  const seqs = events.map((e) => e.seq);
  assert.equal(new Set(seqs).size, seqs.length, `doubled events: ${seqs}`);
  assert.ok(isOneToN(seqs), `missing events: ${seqs}`);
  const count = (type) => events.filter((e) => e.type === type).length;
  assert.equal(count("agent_started"), 1);
  assert.equal(count("agent_thinking"), 1);
  assert.equal(count("partial_result"), 25);
  assert.equal(count("tool_executing"), 1);
  assert.equal(count("tool_completed"), 1);
  assert.equal(count("agent_completed"), 1);
  assert.equal(events.length, 5 + 25 + count("tool_progress"));
  const text = (await p.$$eval(`${runSel(runId)} ${sel("answer")}`, (n) => n.map((a) => a.textContent))).join("");
  assert.equal(text, Array.from({ length: 25 }, (_, i) => `p${i + 1} `).join(""));

  // The notice says how many events the server replayed; some were emitted while away.
  const replayed = Number(await notice.getAttribute("data-replayed"));
  assert.ok(replayed >= 1, `replayed ${replayed}`);
  assert.match(await notice.textContent(), new RegExp(`Reconnected: ${replayed} events? replayed`));
    // The first connection asked for the user's history; the one that worked after the cut
    // resumed after the last seq the page had, in the same epoch.
    assert.equal(sockets[0].get("after_seq"), "0");
    assert.equal(sockets[0].get("epoch"), null);
    const last = sockets.at(-1);
    const afterSeq = Number(last.get("after_seq"));
    assert.ok(afterSeq >= 6 && afterSeq < seqs.length, `resumed after ${afterSeq}`);
    assert.ok(last.get("epoch"), "epoch on the resume");
    assert.equal(await p.getAttribute(runSel(runId), "data-epoch"), last.get("epoch"));
    const states = await p.evaluate(() => window.__states);
  assert.ok(states.includes("reconnecting"), `states ${states}`);
  assert.equal(states.at(-1), "open");
}, { shot: "reconnect-after-cut" });

browserTest("after a server restart the page says history was lost and works on", async ({ server, page, servers, defer }) => {
  const proxy = await startProxy(server.port);
  defer(() => proxy.close());
  const p = await page(undefined, { ignore: WS_REFUSED });
  await signIn(p, proxy.url, "alice");
  const before = await startRun(p, "scripted", { steps: [{ think: "sleeping" }, { tool: "sleep", args: { ms: 60_000 } }] });
  await p.waitForSelector(`${runSel(before)} [data-type="tool_executing"]`);

  // The server dies (no orderly stop, so the run never ends) and another takes its place.
  const second = await startServer();
  servers.push(second);
  proxy.target = second.port;
  await server.stop("SIGKILL");

  const gap = await p.waitForSelector(sel("gap-notice"), { timeout: 15_000 });
  assert.match(await gap.textContent(), /history was reset/);
  assert.equal(await waitDone(p, before), "lost");
  await p.waitForSelector(`${sel("connection-status")}[data-state="open"]`);

  // The new server numbers this user's events from 1 again; the page shows them all.
  const after = await startRun(p, "echo", "a new start");
  assert.equal(await waitDone(p, after), "succeeded");
  const seqs = (await eventsOf(p, after)).map((e) => e.seq);
  assert.ok(isOneToN(seqs), `seqs ${seqs}`);
  assert.notEqual(await p.getAttribute(runSel(after), "data-epoch"), await p.getAttribute(runSel(before), "data-epoch"));
}, { shot: "reconnect-after-server-restart" });
