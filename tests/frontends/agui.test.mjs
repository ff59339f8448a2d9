// POST /v1/agui/{agent} read by AG-UI's own client: @ag-ui/client's HttpAgent runs the
// stream through its parser, its verifier (which refuses content without a start, a finish
// with anything open, anything after the end) and its message assembly.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { HttpAgent } from "@ag-ui/client";

import { CALCULATE, startServer, token } from "./helpers.mjs";

let server;
let bearer;

before(async () => {
  server = await startServer();
  bearer = await token(server, "agui-user");
});
after(() => server?.stop());

function agent(threadId, name = "scripted") {
  return new HttpAgent({
    url: `${server.url}/v1/agui/${name}`,
    threadId,
    headers: { Authorization: `Bearer ${bearer}` },
  });
}

/** Runs the agent, returning the events its subscriber saw and the run's outcome. */
async function run(a, params) {
  const events = [];
  const subscriber = { onEvent: ({ event }) => void events.push(event) };
  try {
    const result = await a.runAgent(params, subscriber);
    return { events, result };
  } catch (error) {
    return { events, error };
  }
}

test("a run's reasoning, tool call and answer assemble into messages", async () => {
  const a = agent("th-calc");
  a.addMessage({ id: "u1", role: "user", content: "what is 2+2?" });
  const { events, result, error } = await run(a, { forwardedProps: { input: CALCULATE } });
  assert.equal(error, undefined, `the client refused the stream: ${error}`);

  const types = events.map((e) => e.type);
  assert.equal(types[0], "RUN_STARTED");
  assert.equal(types.at(-1), "RUN_FINISHED");
  assert.equal(events[0].threadId, "th-calc");
  const runId = events[0].runId;
  assert.match(runId, /^run_/);
  assert.deepEqual(events.at(-1).outcome, { type: "success" });

  const reasoning = a.messages.find((m) => m.role === "reasoning");
  assert.equal(reasoning?.content, "adding");

  const call = a.messages.flatMap((m) => m.toolCalls ?? [])[0];
  assert.equal(call?.function.name, "calculator");
  assert.deepEqual(JSON.parse(call.function.arguments), { expr: "2+2" });
  assert.equal(call.id, `${runId}-tc_1`);
  const toolMessage = a.messages.find((m) => m.role === "tool");
  assert.equal(toolMessage?.toolCallId, call.id);
  assert.deepEqual(JSON.parse(toolMessage.content), { value: 4 });

  const answer = a.messages.filter((m) => m.role === "assistant" && m.content).at(-1);
  assert.equal(answer?.content, "4");
  assert.ok(result.newMessages.some((m) => m.content === "4"), "the answer is among the run's new messages");
});

test("the last user message's text is the input when forwardedProps has none", async () => {
  const a = agent("th-echo", "echo");
  a.addMessage({ id: "u1", role: "user", content: "hello there" });
  const { error } = await run(a, {});
  assert.equal(error, undefined, `${error}`);
  const answer = a.messages.filter((m) => m.role === "assistant").map((m) => m.content).join("");
  assert.equal(answer, "hello there");
});

test("a failing run ends with RUN_ERROR carrying the run's error message", async () => {
  const a = agent("th-fail");
  const { events, error } = await run(a, {
    forwardedProps: { input: { steps: [{ text: "trying" }, { fail: "boom" }] } },
  });
  const last = events.at(-1);
  assert.equal(last?.type, "RUN_ERROR", `events: ${JSON.stringify(events.map((e) => e.type))}`);
  assert.equal(last.message, "boom");
  assert.ok(!events.some((e) => e.type === "RUN_FINISHED"));
  // The partial answer was closed before the error, as the verifier requires.
  assert.ok(events.some((e) => e.type === "TEXT_MESSAGE_END"));
  // The client reports it as the RUN_ERROR event (to onRunErrorEvent), not as a rejection.
  assert.equal(error, undefined, `${error}`);
});

test("a cancelled run finishes with the cancelled outcome", async () => {
  const a = agent("th-cancel");
  const seen = [];
  let answering;
  const answered = new Promise((resolve) => (answering = resolve));
  const cancelled = (async () => {
    // Cancel the run through agentcast's own API once its first words have arrived.
    await answered;
    const runId = seen[0].runId;
    const res = await fetch(`${server.url}/v1/runs/${runId}/cancel`, {
      method: "POST",
      headers: { Authorization: `Bearer ${bearer}` },
    });
    assert.equal(res.status, 202);
  })();
  const subscriber = {
    onEvent: ({ event }) => {
      seen.push(event);
      if (event.type === "TEXT_MESSAGE_CONTENT") answering();
    },
  };
  await a.runAgent(
    { forwardedProps: { input: { steps: [{ text: "waiting" }, { sleep_ms: 30000 }, { text: "never" }] } } },
    subscriber,
  );
  await cancelled;
  assert.equal(seen.at(-1).type, "RUN_FINISHED");
  assert.deepEqual(seen.at(-1).outcome, { type: "cancelled" });
});

test("refusals are JSON errors the client reports", async () => {
  const unknown = await run(agent("th-x", "no-such-agent"), { forwardedProps: { input: "x" } });
  assert.equal(unknown.error?.status, 400);
  assert.equal(unknown.error.payload?.code, "unknown_agent");

  const anonymous = new HttpAgent({ url: `${server.url}/v1/agui/echo` });
  const unauthorized = await run(anonymous, { forwardedProps: { input: "x" } });
  assert.equal(unauthorized.error?.status, 401);
});

test("an approval ends the stream with the interrupt outcome, and respond lets the run go on", async () => {
  const a = agent("th-approve");
  const input = {
    steps: [{ tool: "calculator", args: { expr: "6*7" }, approve: true }, { text: "done" }],
  };
  const { events, error } = await run(a, { forwardedProps: { input } });
  assert.equal(error, undefined, `the client refused the stream: ${error}`);
  const runId = events[0].runId;
  const last = events.at(-1);
  assert.equal(last.type, "RUN_FINISHED");
  assert.equal(last.outcome?.type, "interrupt", JSON.stringify(last));
  const [interrupt] = last.outcome.interrupts;
  assert.equal(interrupt.reason, "tool_approval");
  assert.equal(interrupt.metadata?.tool, "calculator");
  assert.deepEqual(interrupt.metadata?.args, { expr: "6*7" });

  // The run waits; the answer goes through agentcast's own respond.
  const headers = { Authorization: `Bearer ${bearer}`, "content-type": "application/json" };
  const answered = await fetch(`${server.url}/v1/runs/${runId}/respond`, {
    method: "POST",
    headers,
    body: JSON.stringify({ interrupt_id: interrupt.id, response: { approved: true, args: { expr: "2*3" } } }),
  });
  assert.equal(answered.status, 202, await answered.text());
  let view;
  for (let i = 0; i < 200; i++) {
    view = await (await fetch(`${server.url}/v1/runs/${runId}`, { headers })).json();
    if (view.status !== "running") break;
    await new Promise((r) => setTimeout(r, 25));
  }
  assert.equal(view.status, "succeeded");
  const executing = view.events.find((e) => e.type === "tool_executing");
  assert.deepEqual(executing.data.args, { expr: "2*3" });
});
