// A run published from outside the server (PROTOCOL.md section 11) shows in the page like any
// other: its card has the publisher's agent name, its tool card and its answer.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { BIN, browserTest, runSel, sel, signIn, waitDone } from "./helpers.mjs";

browserTest("a published run appears with the publisher's agent name", async ({ server, page }) => {
  const p = await page();
  await signIn(p, server.url, "alice");
  // Dev mode: the CLI signs a publisher token with the dev secret, as the server does.
  const token = execFileSync(BIN, ["token", "crm-assistant", "--publisher"], {
    env: { PATH: process.env.PATH },
    stdio: ["ignore", "pipe", "ignore"],
  }).toString().trim();
  const headers = { Authorization: `Bearer ${token}`, "content-type": "application/json" };
  const created = await fetch(`${server.url}/v1/publish/runs`, {
    method: "POST",
    headers,
    body: JSON.stringify({ user: "alice", agent: "crm-assistant", input: "find Ada" }),
  });
  assert.equal(created.status, 201, await created.clone().text());
  const { run_id: runId } = await created.json();
  const card = runSel(runId);
  await p.waitForSelector(card);
  assert.equal(await p.textContent(`${card} ${sel("run-agent")}`), "crm-assistant");

  const events = [
    { n: 1, type: "tool_executing", data: { tool_call_id: "c1", tool: "crm_search", args: { q: "Ada" } } },
    { n: 2, type: "tool_completed", data: { tool_call_id: "c1", tool: "crm_search", ok: true, result: { hits: 1 }, error: null } },
    { n: 3, type: "partial_result", data: { text: "Ada Lovelace, customer since 1843." } },
    { n: 4, type: "agent_completed", data: { status: "succeeded", result: "found", error: null } },
  ];
  const batch = await fetch(`${server.url}/v1/publish/runs/${runId}/events`, {
    method: "POST",
    headers,
    body: JSON.stringify({ events }),
  });
  assert.equal(batch.status, 200, await batch.clone().text());
  assert.equal(await waitDone(p, runId, 10_000), "succeeded");
  const tool = `${card} ${sel("tool-card")}[data-tool="crm_search"]`;
  assert.equal(await p.getAttribute(tool, "data-state"), "ok");
  assert.match(await p.textContent(`${card} ${sel("answer")}`), /Ada Lovelace/);
}, { shot: "published" });
