// The page: it loads, signs in, and shows echo and scripted runs event by event, in order.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { BIN, browserTest, eventsOf, runSel, screenshot, sel, signIn, startPreset, startRun, waitDone } from "./helpers.mjs";

/** The types in page order, with runs of tool_progress folded into one "tool_progress*". */
function foldProgress(events) {
  const out = [];
  for (const e of events) {
    if (e.type === "tool_progress" && out.at(-1) === "tool_progress*") continue;
    out.push(e.type === "tool_progress" ? "tool_progress*" : e.type);
  }
  return out;
}

function assertSeqsIncrease(events) {
  for (let i = 1; i < events.length; i++) {
    assert.ok(events[i].seq > events[i - 1].seq, `seq ${events[i].seq} after ${events[i - 1].seq} in page order`);
  }
}

browserTest("the page loads and signs in", async ({ server, page }) => {
  const p = await page();
  await p.goto(`${server.url}/`);
  assert.equal(await p.title(), "agentcast");
  await p.waitForSelector(sel("signin"));
  assert.equal(await p.getAttribute(sel("connection-status"), "data-state"), "signed-out");
  assert.equal(await p.isVisible(sel("app")), false);
  await screenshot(p, "page-signin-form");

  await signIn(p, server.url, "alice");
  assert.equal(await p.textContent(sel("user-name")), "alice");
  assert.equal(await p.textContent(sel("connection-label")), "live");
  assert.equal(await p.isVisible(sel("signin")), false);
  const agents = await p.$$eval(`${sel("agent-select")} option`, (os) => os.map((o) => o.value));
  assert.ok(agents.includes("echo") && agents.includes("scripted"), `agents ${agents}`);
  for (const preset of ["echo", "tools", "failing-tool", "tool-panic", "agent-panic", "agent-fail", "long-sleep", "many-steps", "ask"]) {
    assert.ok(await p.isVisible(sel(`preset-${preset}`)), `preset ${preset}`);
  }
  const tools = await p.$$eval(`${sel("tool-list")} code`, (cs) => cs.map((c) => c.textContent));
  assert.deepEqual([...tools].sort(), ["calculator", "clock", "fail", "panic", "sleep"]);
  assert.ok(await p.isVisible(sel("no-runs")));

  // A reload keeps the user signed in (the token is in sessionStorage).
  await p.reload();
  await p.waitForSelector(`${sel("connection-status")}[data-state="open"]`);
  assert.equal(await p.textContent(sel("user-name")), "alice");
}, { shot: "page-signin" });

browserTest("an echo run shows thinking, streamed text and the result, as text not HTML", async ({ server, page }) => {
  const p = await page();
  await signIn(p, server.url, "alice");
  const input = `<img src=x onerror="window.__xss=1">Hello <b>world</b> & friends: this is streamed back.`;
  const runId = await startRun(p, "echo", input);
  assert.equal(await waitDone(p, runId), "succeeded");

  const events = await eventsOf(p, runId);
  const chunks = Math.ceil([...input].length / 16);
  assert.deepEqual(events.map((e) => e.type), [
    "agent_started", "agent_thinking", ...Array(chunks).fill("partial_result"), "agent_completed",
  ]);
  // The user's first run: seq 1..N in page order.
  assert.deepEqual(events.map((e) => e.seq), events.map((_, i) => i + 1));

  const card = runSel(runId);
  assert.equal(await p.textContent(`${card} ${sel("run-agent")}`), "echo");
  assert.equal(await p.textContent(`${card} ${sel("thinking-text")}`), `Echoing ${[...input].length} characters`);
  assert.equal(await p.textContent(`${card} ${sel("answer")}`), input);
  assert.equal(await p.textContent(`${card} ${sel("run-result")}`), input);
  assert.equal(await p.textContent(`${card} ${sel("run-status")}`), "succeeded");
  assert.equal(await p.isVisible(`${card} ${sel("cancel-run")}`), false);
  // Server text is text: no element was made from it, no script ran.
  assert.equal(await p.$$eval(`${sel("runs")} img, ${sel("runs")} b`, (n) => n.length), 0);
  assert.equal(await p.evaluate(() => window.__xss), undefined);
}, { shot: "page-echo" });

browserTest("a scripted run with tools shows every event kind in order", async ({ server, page }) => {
  const p = await page();
  await signIn(p, server.url, "alice");
  const steps = [
    { think: "I will add, read the clock, wait, and try two broken tools." },
    { tool: "calculator", args: { expr: "2+3*4" } },
    { tool: "clock" },
    { tool: "sleep", args: { ms: 400 } },
    { text: "14, " },
    { tool: "fail", args: { message: "no <script>alert(1)</script> here" } },
    { tool: "panic" },
    { text: "and that is all." },
  ];
  const runId = await startRun(p, "scripted", { steps });
  assert.equal(await waitDone(p, runId), "succeeded");

  const events = await eventsOf(p, runId);
  assertSeqsIncrease(events);
  assert.deepEqual(events.map((e) => e.seq), events.map((_, i) => i + 1), "seqs 1..N, each once");
  assert.deepEqual(foldProgress(events), [
    "agent_started",
    "agent_thinking",
    "tool_executing", "tool_completed",
    "tool_executing", "tool_completed",
    "tool_executing", "tool_progress*", "tool_completed",
    "partial_result",
    "tool_executing", "tool_completed",
    "tool_executing", "tool_completed",
    "partial_result",
    "agent_completed",
  ]);

  const card = runSel(runId);
  const tools = await p.$$eval(`${card} ${sel("tool-card")}`, (cards) => cards.map((c) => ({
    tool: c.dataset.tool,
    state: c.dataset.state,
    args: c.querySelector('[data-testid="tool-args"]').textContent,
    result: c.querySelector('[data-testid="tool-result"]')?.textContent ?? null,
    error: c.querySelector('[data-testid="tool-error"]')?.dataset.code ?? null,
    errorText: c.querySelector('[data-testid="tool-error"]')?.textContent ?? null,
    duration: c.querySelector('[data-testid="tool-duration"]').textContent,
    progress: c.querySelectorAll('[data-type="tool_progress"]').length,
    bar: c.querySelector("progress").value,
    progressMessage: c.querySelector('[data-testid="tool-progress-message"]').textContent,
  })));
  assert.deepEqual(tools.map((t) => [t.tool, t.state, t.error]), [
    ["calculator", "ok", null],
    ["clock", "ok", null],
    ["sleep", "ok", null],
    ["fail", "error", "tool_failed"],
    ["panic", "error", "tool_panicked"],
  ]);
  const [calc, clock, sleep, fail] = tools;
  assert.equal(JSON.parse(calc.args).expr, "2+3*4");
  assert.match(calc.result, /14/);
  assert.match(clock.result, /\d{4}-\d\d-\d\dT/);
  assert.ok(sleep.progress >= 1, "sleep reports progress");
  assert.equal(sleep.bar, 1);
  assert.equal(sleep.progressMessage, "slept 400 of 400 ms");
  assert.match(sleep.duration, /^\d+ ms$/);
  assert.ok(Number.parseInt(sleep.duration, 10) >= 400, `sleep took ${sleep.duration}`);
  assert.equal(JSON.parse(fail.args).message, "no <script>alert(1)</script> here");
  assert.match(fail.errorText, /^tool_failed: /);
  for (const t of tools) assert.match(t.duration, /\d+ ms|s$/);

  assert.deepEqual(await p.$$eval(`${card} ${sel("answer")}`, (n) => n.map((a) => a.textContent)), ["14, ", "and that is all."]);
  assert.equal(await p.textContent(`${card} ${sel("run-result")}`), "and that is all.");
  assert.match(await p.textContent(`${card} [data-type="agent_completed"]`), /5 tool calls/);
  assert.equal(await p.$$eval(`${sel("runs")} script`, (n) => n.length), 0);
}, { shot: "page-scripted-tools" });

browserTest("presets run side by side: failing tool, tool panic, agent panic, agent failure", async ({ server, page }) => {
  const p = await page();
  await signIn(p, server.url, "alice");
  // Started one after the other without waiting: several runs at once.
  const failingTool = await startPreset(p, "failing-tool");
  const toolPanic = await startPreset(p, "tool-panic");
  const agentPanic = await startPreset(p, "agent-panic");
  const agentFail = await startPreset(p, "agent-fail");
  const tools = await startPreset(p, "tools");
  assert.equal(await p.$$eval(sel("run"), (n) => n.length), 5);

  assert.equal(await waitDone(p, failingTool), "succeeded");
  assert.equal(await p.getAttribute(`${runSel(failingTool)} ${sel("tool-error")}`, "data-code"), "tool_failed");
  assert.equal(await waitDone(p, toolPanic), "succeeded");
  assert.equal(await p.getAttribute(`${runSel(toolPanic)} ${sel("tool-error")}`, "data-code"), "tool_panicked");
  assert.equal(await waitDone(p, agentPanic), "failed");
  assert.equal(await p.getAttribute(`${runSel(agentPanic)} ${sel("run-error-value")}`, "data-code"), "agent_panicked");
  assert.equal(await waitDone(p, agentFail), "failed");
  assert.equal(await p.getAttribute(`${runSel(agentFail)} ${sel("run-error-value")}`, "data-code"), "agent_failed");
  assert.match(await p.textContent(`${runSel(agentFail)} ${sel("run-error-value")}`), /I give up/);
  assert.equal(await waitDone(p, tools), "succeeded");
  assert.equal(await p.textContent(sel("run-count")), "5 runs, 0 running");

  // Across the runs every seq of this user appears exactly once.
  const seqs = await p.$$eval('[data-testid="event"]', (n) => n.map((e) => Number(e.dataset.seq)));
  assert.deepEqual([...seqs].sort((a, b) => a - b), seqs.map((_, i) => i + 1));

  // A refused start is shown, not thrown.
  await p.selectOption(sel("agent-select"), "scripted");
  await p.fill(sel("run-input"), JSON.stringify({ steps: [{ tool: "nope" }] }));
  await p.click(sel("start-run"));
  await p.waitForFunction(() => document.querySelector('[data-testid="start-error"]').textContent.startsWith("invalid_field"));
  await p.fill(sel("run-input"), "not json");
  await p.click(sel("start-run"));
  await p.waitForFunction(() => document.querySelector('[data-testid="start-error"]').textContent.includes("not valid JSON"));
}, { shot: "page-presets" });

browserTest("with a secret, the page signs in with a pasted token and refuses a bad one", async ({ server, page }) => {
  // Chromium logs the refused requests (404 for the dev route, 401 for the bad token).
  const p = await page(undefined, { ignore: /Failed to load resource: .* (404|401)/ });
  await p.goto(`${server.url}/`);
  // The dev route does not exist: the page says so and offers the token form.
  await p.click(sel("signin-button"));
  await p.waitForFunction(() => document.querySelector('[data-testid="signin-error"]').textContent.includes("not in dev mode"));
  assert.equal(await p.isVisible(sel("signin-token")), true);
  assert.equal(await p.isVisible(sel("signin-dev-form")), false);

  const other = execFileSync(BIN, ["token", "alice", "--jwt-secret", "not-the-secret-but-as-long-as-one-0123"], { encoding: "utf8" }).trim();
  await p.fill(sel("signin-token"), other);
  await p.click(sel("signin-token-button"));
  await p.waitForFunction(() => document.querySelector('[data-testid="signin-error"]').textContent.startsWith("The server refused this token"));

  const token = execFileSync(BIN, ["token", "carol", "--jwt-secret", "s3cret-of-at-least-32-bytes-for-the-page"], { encoding: "utf8" }).trim();
  await p.fill(sel("signin-token"), token);
  await p.click(sel("signin-token-button"));
  await p.waitForSelector(`${sel("connection-status")}[data-state="open"]`);
  assert.equal(await p.textContent(sel("user-name")), "carol");
  const runId = await startRun(p, "echo", "signed with a secret");
  assert.equal(await waitDone(p, runId), "succeeded");
}, { shot: "page-token-signin", serverArgs: ["--jwt-secret", "s3cret-of-at-least-32-bytes-for-the-page"] });
