// Two users in two browser contexts never see each other's runs; two tabs of one user see the
// same runs, event for event, whichever tab started them.

import assert from "node:assert/strict";
import { allEvents, browserTest, eventsOf, runSel, sel, signIn, startRun, waitDone } from "./helpers.mjs";

const runIds = (page) => page.$$eval('[data-testid="run"]', (n) => n.map((r) => r.dataset.runId).sort());

browserTest("two users are isolated, two tabs of one user see the same runs", async ({ server, context, page }) => {
  const aliceContext = await context();
  const alice1 = await page(aliceContext, { label: "alice-tab1" });
  const alice2 = await page(aliceContext, { label: "alice-tab2" });
  const bob = await page(await context(), { label: "bob" });
  await signIn(alice1, server.url, "alice");
  await signIn(alice2, server.url, "alice");
  await signIn(bob, server.url, "bob");

  // Alice starts a run in her first tab: both her tabs show it, event for event.
  const a1 = await startRun(alice1, "scripted", { steps: [
    { think: "alice's first run" }, { tool: "calculator", args: { expr: "6*7" } }, { tool: "sleep", args: { ms: 300 } }, { text: "42" },
  ] });
  await alice2.waitForSelector(runSel(a1));
  assert.equal(await waitDone(alice1, a1), "succeeded");
  assert.equal(await waitDone(alice2, a1), "succeeded");
  const inTab1 = await eventsOf(alice1, a1);
  assert.deepEqual(await eventsOf(alice2, a1), inTab1);
  assert.deepEqual(inTab1.map((e) => e.seq), inTab1.map((_, i) => i + 1));

  // Bob saw nothing of it; his own run has his own numbering, from 1.
  assert.deepEqual(await runIds(bob), []);
  const b1 = await startRun(bob, "echo", "bob's secret plans");
  assert.equal(await waitDone(bob, b1), "succeeded");
  const bobEvents = await eventsOf(bob, b1);
  assert.equal(bobEvents[0].seq, 1);

  // A run started in Alice's second tab shows in her first tab too.
  const a2 = await startRun(alice2, "scripted", { steps: [{ think: "from tab 2" }, { tool: "sleep", args: { ms: 200 } }, { text: "done" }] });
  await alice1.waitForSelector(runSel(a2));
  assert.equal(await waitDone(alice2, a2), "succeeded");
  assert.equal(await waitDone(alice1, a2), "succeeded");
  assert.deepEqual(await eventsOf(alice1, a2), await eventsOf(alice2, a2));

  // Bob's run appeared nowhere in Alice's tabs, and hers nowhere in his.
  assert.deepEqual(await runIds(alice1), [a1, a2].sort());
  assert.deepEqual(await runIds(alice2), [a1, a2].sort());
  assert.deepEqual(await runIds(bob), [b1]);
  for (const tab of [alice1, alice2]) {
    const text = await tab.textContent(sel("runs"));
    assert.ok(!text.includes("bob's secret plans"), "bob's text in alice's page");
  }
  assert.ok(!(await bob.textContent(sel("runs"))).includes("from tab 2"));
  assert.ok((await allEvents(bob)).every((e) => e.run === b1));

  // A tab Alice opens now shows her earlier runs (replayed from the server's buffer) and
  // none of Bob's.
  const alice3 = await page(aliceContext, { label: "alice-tab3-later" });
  await signIn(alice3, server.url, "alice");
  await alice3.waitForSelector(`${runSel(a2)}[data-status="succeeded"]`);
  assert.deepEqual(await runIds(alice3), [a1, a2].sort());
  assert.deepEqual(await eventsOf(alice3, a1), inTab1);
  const history = await alice3.getAttribute(sel("history-notice"), "data-replayed");
  assert.equal(Number(history), (await allEvents(alice1)).length);
}, { shot: "users" });
