// The `llm` agent (PROTOCOL.md section 14) in the page, against a fake OpenAI-compatible
// server written here in node: a real HTTP server on 127.0.0.1 that streams recorded chunk
// shapes (reasoning, a tool call split over chunks, then text) and records the requests.
//
// Saves target/browser-screenshots/llm-run.png, the run's card at 1200x800: the README's
// docs/img/llm.png is a copy of it.

import assert from "node:assert/strict";
import http from "node:http";
import path from "node:path";
import { after } from "node:test";
import { SCREENSHOTS, browserTest, runSel, sel, signIn, startRun, waitDone } from "./helpers.mjs";

const chunk = (delta, finish = null) => JSON.stringify({
  id: "chatcmpl-fake", object: "chat.completion.chunk", created: 1767000000, model: "fake-model",
  choices: [{ index: 0, delta, finish_reason: finish }],
});
const usage = (p, c) => JSON.stringify({ id: "chatcmpl-fake", object: "chat.completion.chunk", choices: [], usage: { prompt_tokens: p, completion_tokens: c, total_tokens: p + c } });

/** The replies, one per request in order: a call of the calculator, then the answer. */
const REPLIES = [
  [
    chunk({ role: "assistant", content: null }),
    chunk({ reasoning_content: "The user wants 6 × 7. " }),
    chunk({ reasoning_content: "I will use the calculator rather than guess." }),
    chunk({ tool_calls: [{ index: 0, id: "call_1", type: "function", function: { name: "calculator", arguments: "" } }] }),
    chunk({ tool_calls: [{ index: 0, function: { arguments: "{\"expr\":" } }] }),
    chunk({ tool_calls: [{ index: 0, function: { arguments: " \"6*7\"}" } }] }),
    chunk({}, "tool_calls"),
    usage(42, 17),
    "[DONE]",
  ],
  [
    chunk({ role: "assistant", content: "" }),
    chunk({ reasoning: "The calculator says 42." }),
    chunk({ content: "6 × 7 is " }),
    chunk({ content: "42." }),
    chunk({}, "stop"),
    usage(71, 9),
    "[DONE]",
  ],
];

const requests = [];
const fake = http.createServer((req, res) => {
  let body = "";
  req.on("data", (d) => { body += d; });
  req.on("end", () => {
    requests.push({ path: req.url, body: JSON.parse(body) });
    const reply = REPLIES[requests.length - 1];
    if (!reply) {
      res.writeHead(500, { "content-type": "application/json" });
      res.end(JSON.stringify({ error: { message: "no more replies" } }));
      return;
    }
    res.writeHead(200, { "content-type": "text/event-stream" });
    for (const payload of reply) res.write(`data: ${payload}\n\n`);
    res.end();
  });
});
await new Promise((resolve) => fake.listen(0, "127.0.0.1", resolve));
after(() => fake.close());
const base = `http://127.0.0.1:${fake.address().port}/v1`;

browserTest("an llm run shows the model's thinking, its tool call and its streamed answer", async ({ context, page, server }) => {
  const p = await page(await context({ viewport: { width: 1200, height: 800 } }));
  await signIn(p, server.url, "alice");
  // Offered by the page once configured.
  await p.waitForSelector(`${sel("agent-select")} option[value="llm"]`, { state: "attached" });
  const runId = await startRun(p, "llm", "What is 6 × 7?");
  assert.equal(await waitDone(p, runId), "succeeded");

  const run = runSel(runId);
  const thinking = await p.$$eval(`${run} ${sel("thinking-text")}`, (ns) => ns.map((n) => n.textContent));
  assert.deepEqual(thinking, ["The user wants 6 × 7. ", "I will use the calculator rather than guess.", "The calculator says 42."]);
  const tools = await p.$$eval(`${run} ${sel("tool-card")}`, (cards) => cards.map((c) => ({
    tool: c.dataset.tool,
    state: c.dataset.state,
    args: JSON.parse(c.querySelector('[data-testid="tool-args"]').textContent),
  })));
  assert.deepEqual(tools, [{ tool: "calculator", state: "ok", args: { expr: "6*7" } }]);
  assert.equal(await p.textContent(`${run} ${sel("answer")}`), "6 × 7 is 42.");
  assert.equal(await p.textContent(`${run} ${sel("run-result")}`), "6 × 7 is 42.");

  // The model got the calculator's result back, under its own call id.
  assert.equal(requests.length, 2);
  const tool = requests[1].body.messages.find((m) => m.role === "tool");
  assert.equal(tool.tool_call_id, "call_1");
  assert.equal(JSON.parse(tool.content).value, 42);

  await p.locator(run).screenshot({ path: path.join(SCREENSHOTS, "llm-run.png") });
}, { serverArgs: ["--llm-base-url", base, "--llm-model", "fake-model"] });
