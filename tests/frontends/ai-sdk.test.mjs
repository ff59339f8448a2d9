// POST /v1/ai-sdk/{agent} and its resume read by the AI SDK's own client code: `ai`'s
// DefaultChatTransport (what useChat uses: it checks every part against the SDK's schema)
// and readUIMessageStream (the SDK's stream processing, which builds the assistant message).

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { DefaultChatTransport, readUIMessageStream } from "ai";

import { CALCULATE, startServer, token } from "./helpers.mjs";

let server;
let bearer;

before(async () => {
  server = await startServer();
  bearer = await token(server, "ai-sdk-user");
});
after(() => server?.stop());

function transport(agent, body = {}) {
  return new DefaultChatTransport({
    api: `${server.url}/v1/ai-sdk/${agent}`,
    headers: { Authorization: `Bearer ${bearer}` },
    body,
  });
}

const question = (text) => [{ id: "u1", role: "user", parts: [{ type: "text", text }] }];

function send(t, chatId, text = "go") {
  return t.sendMessages({
    chatId,
    messages: question(text),
    trigger: "submit-message",
    messageId: undefined,
    abortSignal: undefined,
  });
}

/** The SDK's message built from a stream, and the errors its processing reported. */
async function assemble(stream) {
  const errors = [];
  let message;
  for await (const snapshot of readUIMessageStream({ stream, onError: (e) => errors.push(e) })) {
    message = snapshot;
  }
  return { message, errors };
}

test("reasoning, text and a dynamic tool part in state output-available", async () => {
  const { message, errors } = await assemble(await send(transport("scripted", { input: CALCULATE }), "chat-calc"));
  assert.deepEqual(errors, []);
  assert.equal(message.role, "assistant");
  assert.match(message.id, /^run_/);
  const kinds = message.parts.map((p) => p.type);
  assert.deepEqual(kinds, ["reasoning", "dynamic-tool", "text"]);
  const [reasoning, tool, text] = message.parts;
  assert.equal(reasoning.text, "adding");
  assert.equal(reasoning.state, "done");
  assert.equal(tool.toolName, "calculator");
  assert.equal(tool.state, "output-available");
  assert.deepEqual(tool.input, { expr: "2+2" });
  assert.deepEqual(tool.output, { value: 4 });
  assert.equal(tool.toolCallId, `${message.id}-tc_1`);
  assert.equal(text.text, "4");
  assert.equal(text.state, "done");
});

test("the last user message's text is the input when the body has none", async () => {
  const { message, errors } = await assemble(await send(transport("echo"), "chat-echo", "hello there"));
  assert.deepEqual(errors, []);
  const text = message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
  assert.equal(text, "hello there");
});

test("a failing run gives the SDK an error with the run's message", async () => {
  const input = { steps: [{ text: "trying" }, { fail: "boom" }] };
  const { message, errors } = await assemble(await send(transport("scripted", { input }), "chat-fail"));
  assert.equal(errors.length, 1, `${errors}`);
  assert.equal(errors[0].message, "boom");
  assert.equal(message.parts.find((p) => p.type === "text")?.text, "trying");
});

test("a failed tool call is a dynamic tool part in state output-error", async () => {
  const input = { steps: [{ tool: "fail", args: {} }, { text: "done" }] };
  const { message, errors } = await assemble(await send(transport("scripted", { input }), "chat-tool-fail"));
  assert.deepEqual(errors, []);
  const tool = message.parts.find((p) => p.type === "dynamic-tool");
  assert.equal(tool?.state, "output-error");
  assert.equal(typeof tool.errorText, "string");
  assert.ok(tool.errorText.length > 0);
});

test("resume mid-run replays the run from its start, then follows it live", async () => {
  const input = { steps: [{ think: "hm" }, { text: "before" }, { sleep_ms: 1500 }, { text: " after" }] };
  const t = transport("scripted", { input });
  const original = await send(t, "chat-resume");
  // Read the original stream until the run is in its sleep, as a tab that then reloads.
  const reader = original.getReader();
  const seen = [];
  while (!seen.some((c) => c.type === "text-delta" && c.delta === "before")) {
    const { value, done } = await reader.read();
    assert.ok(!done, "the stream ended before the run slept");
    seen.push(value);
  }
  const resumed = await t.reconnectToStream({ chatId: "chat-resume" });
  assert.ok(resumed, "a running run is found (not 204)");
  const [forParts, forMessage] = resumed.tee();
  const chunks = [];
  const collected = (async () => {
    for await (const chunk of forParts) chunks.push(chunk);
  })();
  const { message, errors } = await assemble(forMessage);
  await collected;
  assert.deepEqual(errors, []);
  // The replay begins at the run's start: the same message id and parts as the original.
  assert.equal(chunks[0].type, "start");
  assert.equal(chunks[0].messageId, seen[0].messageId);
  assert.equal(message.parts.find((p) => p.type === "reasoning")?.text, "hm");
  assert.equal(message.parts.find((p) => p.type === "text")?.text, "before after");
  assert.equal(chunks.at(-1).type, "finish");
  // The original stream goes on to the same end.
  const rest = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    rest.push(value);
  }
  assert.deepEqual(rest.map((c) => c.type).slice(-2), ["text-end", "finish"]);
});

test("resume answers 204 when the thread has no running run", async () => {
  assert.equal(await transport("scripted").reconnectToStream({ chatId: "chat-nothing" }), null);
  // A finished run is not resumed either.
  const { errors } = await assemble(await send(transport("echo"), "chat-done", "hi"));
  assert.deepEqual(errors, []);
  assert.equal(await transport("echo").reconnectToStream({ chatId: "chat-done" }), null);
});

test("the response carries the UI message stream header and ends with [DONE]", async () => {
  const res = await fetch(`${server.url}/v1/ai-sdk/echo`, {
    method: "POST",
    headers: { Authorization: `Bearer ${bearer}`, "content-type": "application/json" },
    body: JSON.stringify({ id: "chat-raw", messages: question("hi") }),
  });
  assert.equal(res.status, 200);
  assert.equal(res.headers.get("x-vercel-ai-ui-message-stream"), "v1");
  assert.match(res.headers.get("content-type"), /^text\/event-stream/);
  const text = await res.text();
  assert.ok(text.endsWith("data: [DONE]\n\n"), text.slice(-80));
  assert.match(text, /^id: \d+\ndata: \{/);
});

test("refusals are JSON errors", async () => {
  await assert.rejects(send(transport("no-such-agent"), "chat-x", "hi"), /unknown_agent/);
  const anonymous = new DefaultChatTransport({ api: `${server.url}/v1/ai-sdk/echo` });
  await assert.rejects(send(anonymous, "chat-y", "hi"), /unauthorized/);
});

test("an approval is a tool-approval-request; once approved the same tool part gets its output", async () => {
  const input = {
    steps: [{ tool: "calculator", args: { expr: "6*7" }, approve: true }, { text: "done" }],
  };
  const stream = await send(transport("scripted", { input }), "chat-approve");
  const errors = [];
  let message;
  let answered = false;
  for await (const snapshot of readUIMessageStream({ stream, onError: (e) => errors.push(e) })) {
    message = snapshot;
    const tool = snapshot.parts.find((p) => p.type === "dynamic-tool");
    if (!answered && tool?.state === "approval-requested") {
      assert.equal(tool.toolName, "calculator");
      assert.deepEqual(tool.input, { expr: "6*7" });
      const res = await fetch(`${server.url}/v1/runs/${snapshot.id}/respond`, {
        method: "POST",
        headers: { Authorization: `Bearer ${bearer}`, "content-type": "application/json" },
        body: JSON.stringify({ interrupt_id: tool.approval.id, response: { approved: true } }),
      });
      assert.equal(res.status, 202, await res.text());
      answered = true;
    }
  }
  assert.deepEqual(errors, []);
  assert.ok(answered, "no part reached state approval-requested");
  const tools = message.parts.filter((p) => p.type === "dynamic-tool");
  assert.equal(tools.length, 1, JSON.stringify(message.parts));
  assert.equal(tools[0].state, "output-available");
  assert.deepEqual(tools[0].output, { value: 42 });
  assert.equal(message.parts.at(-1).text, "done");
});

test("a denied approval is a tool part in state output-denied", async () => {
  const input = { steps: [{ tool: "calculator", args: { expr: "1" }, approve: true }, { text: "skipped" }] };
  const stream = await send(transport("scripted", { input }), "chat-deny");
  let message;
  let answered = false;
  for await (const snapshot of readUIMessageStream({ stream })) {
    message = snapshot;
    const tool = snapshot.parts.find((p) => p.type === "dynamic-tool");
    if (!answered && tool?.state === "approval-requested") {
      const res = await fetch(`${server.url}/v1/runs/${snapshot.id}/respond`, {
        method: "POST",
        headers: { Authorization: `Bearer ${bearer}`, "content-type": "application/json" },
        body: JSON.stringify({ interrupt_id: tool.approval.id, response: { approved: false } }),
      });
      assert.equal(res.status, 202, await res.text());
      answered = true;
    }
  }
  const tool = message.parts.find((p) => p.type === "dynamic-tool");
  assert.equal(tool.state, "output-denied", JSON.stringify(message.parts));
  assert.equal(message.parts.at(-1).text, "skipped");
});
