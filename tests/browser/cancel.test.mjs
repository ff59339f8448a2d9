// Cancel from the page: a run in a long tool call ends `cancelled`, and the open tool call is
// closed with an error.

import assert from "node:assert/strict";
import { browserTest, eventsOf, runSel, sel, signIn, startPreset, waitDone } from "./helpers.mjs";

browserTest("cancel stops a run in a long sleep", async ({ server, page }) => {
  const p = await page();
  await signIn(p, server.url, "alice");
  const runId = await startPreset(p, "long-sleep");
  const card = runSel(runId);
  const sleepCard = `${card} ${sel("tool-card")}[data-tool="sleep"]`;

  // Wait until the sleep is under way, then cancel.
  await p.waitForSelector(`${sleepCard}[data-state="running"]`);
  assert.equal(await p.getAttribute(card, "data-status"), "running");
  assert.equal(await p.isVisible(`${sleepCard} ${sel("tool-progress-bar")}`), true);
  assert.equal(await p.textContent(`${sleepCard} ${sel("tool-progress-message")}`), "running…");
  await p.click(`${card} ${sel("cancel-run")}`);

  assert.equal(await waitDone(p, runId, 10_000), "cancelled");
  assert.equal(await p.textContent(`${card} ${sel("run-status")}`), "cancelled");
  assert.equal(await p.getAttribute(sleepCard, "data-state"), "error");
  assert.equal(await p.getAttribute(`${sleepCard} ${sel("tool-error")}`, "data-code"), "cancelled");
  assert.equal(await p.getAttribute(`${card} ${sel("run-error-value")}`, "data-code"), "cancelled");
  assert.equal(await p.isVisible(`${card} ${sel("cancel-run")}`), false);
  assert.equal(await p.textContent(`${card} ${sel("run-error")}`), "");

  // The tool call was closed before the run ended, and nothing came after agent_completed.
  const types = (await eventsOf(p, runId)).map((e) => e.type);
  assert.deepEqual(types.slice(0, 3), ["agent_started", "agent_thinking", "tool_executing"]);
  assert.deepEqual(types.slice(-2), ["tool_completed", "agent_completed"]);
  assert.ok(types.slice(3, -2).every((t) => t === "tool_progress"));
  assert.equal(await p.isVisible(`${sleepCard} ${sel("tool-progress-bar")}`), false);
  // The answer text after the sleep never came.
  assert.equal(await p.$$eval(`${card} ${sel("answer")}`, (n) => n.length), 0);
}, { shot: "cancel" });
