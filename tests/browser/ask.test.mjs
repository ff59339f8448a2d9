// Asking the user (PROTOCOL.md section 12) in the page: a run's approval and its question show
// as cards in every tab of the user; any tab answers, and every tab closes the card.
//
// The first test also saves target/browser-screenshots/approval-card.png, an open approval
// card at 1200x800: the README's docs/img/approval.png is a copy of it.

import assert from "node:assert/strict";
import path from "node:path";
import { SCREENSHOTS, browserTest, eventsOf, runSel, sel, signIn, startPreset, startProxy, startRun, waitDone } from "./helpers.mjs";

const cardSel = (runId, kind) => `${runSel(runId)} ${sel("question-card")}[data-kind="${kind}"]`;

/** Waits until the run's question card of `kind` shows `state` (open, approved, denied,
 *  answered, expired). */
function waitCard(page, runId, kind, state, timeout = 15_000) {
  return page.waitForSelector(`${cardSel(runId, kind)}[data-state="${state}"]`, { timeout });
}

/** What a card shows: its state, message, settled summary, controls, error and note. */
function cardOf(page, runId, kind) {
  return page.$eval(cardSel(runId, kind), (c) => {
    const text = (id) => c.querySelector(`[data-testid="${id}"]`)?.textContent ?? null;
    return {
      state: c.dataset.state,
      message: text("question-message"),
      tool: text("question-tool"),
      expires: text("question-expires"),
      settled: text("question-settled"),
      error: text("question-error"),
      note: text("question-note"),
      args: c.querySelector('[data-testid="question-args"]')?.value ?? null,
      inputs: [...c.querySelectorAll('[data-testid="question-input"]')].map((i) => ({
        field: i.dataset.field ?? null, kind: i.dataset.kind, required: i.required, invalid: i.getAttribute("aria-invalid"),
        label: i.labels?.[0]?.textContent ?? null,
      })),
      buttons: [...c.querySelectorAll("button")].map((b) => b.dataset.testid),
      form: c.querySelector("form") !== null,
    };
  });
}

/** Every tool card of the run: [{tool, state, args, result}]. */
function toolsOf(page, runId) {
  return page.$$eval(`${runSel(runId)} ${sel("tool-card")}`, (cards) => cards.map((c) => ({
    tool: c.dataset.tool,
    state: c.dataset.state,
    args: JSON.parse(c.querySelector('[data-testid="tool-args"]').textContent),
    result: c.querySelector('[data-testid="tool-result"]')?.textContent ?? null,
  })));
}

const ANSWERED = /^answered: (.*)$/s;

/** The JSON answer a settled input card shows. */
function answerOf(settled) {
  const m = ANSWERED.exec(settled ?? "");
  assert.ok(m, `"${settled}" is not an answer`);
  return JSON.parse(m[1]);
}

/** The question of the "ask" preset: its form, built from the schema. (In the schema's order
 *  of properties, which the server does not keep: compared by name.) */
function assertAskForm(card) {
  assert.equal(card.message, "Who should get the result, and how many copies?");
  const byName = [...card.inputs].sort((x, y) => x.field.localeCompare(y.field));
  assert.deepEqual(byName.map((i) => [i.field, i.kind, i.required]), [
    ["copies", "integer", true],
    ["format", "enum", false],
    ["recipient", "text", true],
    ["urgent", "boolean", false],
  ]);
  // Every control has a visible label; required ones are marked.
  assert.deepEqual(byName.map((i) => i.label), ["Copies *", "Format", "Recipient *", "Urgent"]);
  assert.deepEqual(card.buttons, ["question-submit"]);
}

/** The controls are found by their labels, as a screen reader finds them. */
async function assertLabelled(page, runId) {
  const card = page.locator(cardSel(runId, "input"));
  const controls = [["textbox", "Recipient", "recipient"], ["spinbutton", "Copies", "copies"], ["combobox", "Format", "format"], ["checkbox", "Urgent", "urgent"]];
  for (const [role, name, field] of controls) {
    assert.equal(await card.getByRole(role, { name, exact: true }).getAttribute("data-field"), field);
  }
  assert.equal(await page.locator(cardSel(runId, "approval")).getByLabel(/^Arguments/).count(), await page.locator(`${cardSel(runId, "approval")} ${sel("question-args")}`).count());
}

browserTest("two tabs of one user: one approves with edited arguments, both close; a bad answer is refused, a good one closes both", async ({ context, page, server }) => {
  const profile = await context({ viewport: { width: 1200, height: 800 } });
  const a = await page(profile, { label: "tab-a" });
  const b = await page(profile, { label: "tab-b" });
  await signIn(a, server.url, "alice");
  await signIn(b, server.url, "alice");

  const runId = await startPreset(a, "ask");
  const approval = cardSel(runId, "approval");
  await waitCard(a, runId, "approval", "open");
  await waitCard(b, runId, "approval", "open");
  for (const p of [a, b]) {
    const card = await cardOf(p, runId, "approval");
    assert.equal(card.tool, "calculator");
    assert.equal(card.message, "Allow the calculator tool to run?");
    assert.deepEqual(JSON.parse(card.args), { expr: "6*7" });
    assert.deepEqual(card.buttons, ["approve-button", "deny-button"]);
    // The default expiry is 10 minutes.
    assert.match(card.expires, /^expires in (10 min 0 s|9 min \d+ s)$/);
    assert.equal(card.error, "");
    // Nothing runs before the answer; the run says it waits.
    assert.deepEqual(await toolsOf(p, runId), []);
    assert.equal(await p.textContent(`${runSel(runId)} ${sel("run-status")}`), "waiting for you");
    assert.equal(await p.getAttribute(runSel(runId), "data-status"), "running");
  }
  await a.bringToFront();
  await a.screenshot({ path: path.join(SCREENSHOTS, "approval-card.png") });

  // Tab B edits the arguments and approves.
  await b.bringToFront();
  await b.fill(`${approval} ${sel("question-args")}`, '{\n  "expr": "7*8"\n}');
  await b.click(`${approval} ${sel("approve-button")}`);
  for (const p of [a, b]) {
    await waitCard(p, runId, "approval", "approved");
    const card = await cardOf(p, runId, "approval");
    assert.equal(card.settled, 'approved with args {"expr":"7*8"}');
    assert.equal(card.form, false, "a settled card takes no more answers");
    assert.equal(card.args, null);
    assert.equal(card.note, "");
    // The tool ran with the edited arguments.
    await p.waitForSelector(`${runSel(runId)} ${sel("tool-card")}[data-state="ok"]`);
    assert.deepEqual(await toolsOf(p, runId), [{ tool: "calculator", state: "ok", args: { expr: "7*8" }, result: '{"value":56}' }]);
  }

  // Then the question, in both tabs.
  const question = cardSel(runId, "input");
  await waitCard(a, runId, "input", "open");
  await waitCard(b, runId, "input", "open");
  for (const p of [a, b]) {
    assertAskForm(await cardOf(p, runId, "input"));
    await assertLabelled(p, runId);
    assert.equal(await p.textContent(`${runSel(runId)} ${sel("run-status")}`), "waiting for you");
  }
  assert.equal(await a.inputValue(`${question} [data-field="copies"]`), "1", "the schema's default");

  // An answer the schema refuses: the server's message under the form, the card stays open.
  await a.bringToFront();
  await a.fill(`${question} [data-field="recipient"]`, "Ada");
  await a.fill(`${question} [data-field="copies"]`, "0");
  await a.click(`${question} ${sel("question-submit")}`);
  await a.waitForFunction((s) => document.querySelector(s)?.textContent, `${question} ${sel("question-error")}`);
  let card = await cardOf(a, runId, "input");
  assert.equal(card.state, "open");
  assert.match(card.error, /^the response does not fit the question's schema at \/copies: 0 is less than the minimum of 1/);
  assert.equal(card.inputs.find((i) => i.field === "copies").invalid, "true");
  assert.equal(await a.isEnabled(`${question} ${sel("question-submit")}`), true);
  assert.equal((await cardOf(b, runId, "input")).state, "open");
  assert.equal((await cardOf(b, runId, "input")).error, "", "the refusal is for the tab that answered");
  // A required field left empty is the server's to refuse too.
  await a.fill(`${question} [data-field="recipient"]`, "");
  await a.fill(`${question} [data-field="copies"]`, "2");
  await a.click(`${question} ${sel("question-submit")}`);
  await a.waitForFunction((s) => document.querySelector(s)?.textContent.includes("recipient"), `${question} ${sel("question-error")}`);
  card = await cardOf(a, runId, "input");
  assert.match(card.error, /"recipient" is a required property/);
  assert.equal(card.state, "open");
  assert.deepEqual(card.inputs.filter((i) => i.invalid === "true").map((i) => i.field), ["recipient"]);

  // A good answer closes it in both tabs.
  await a.fill(`${question} [data-field="recipient"]`, "Ada");
  await a.fill(`${question} [data-field="copies"]`, "3");
  await a.selectOption(`${question} [data-field="format"]`, { label: "pdf" });
  await a.check(`${question} [data-field="urgent"]`);
  await a.click(`${question} ${sel("question-submit")}`);
  for (const p of [a, b]) {
    await waitCard(p, runId, "input", "answered");
    card = await cardOf(p, runId, "input");
    assert.deepEqual(answerOf(card.settled), { recipient: "Ada", copies: 3, format: "pdf", urgent: true });
    assert.equal(card.form, false);
    assert.equal(card.error, "");
    assert.equal(await waitDone(p, runId), "succeeded");
    assert.equal(await p.textContent(`${runSel(runId)} ${sel("run-status")}`), "succeeded");
  }
  const types = (await eventsOf(a, runId)).map((e) => e.type);
  assert.deepEqual(types, [
    "agent_started", "agent_thinking",
    "input_requested", "input_received", "tool_executing", "tool_completed",
    "input_requested", "input_received",
    "partial_result", "agent_completed",
  ]);
  assert.deepEqual(await eventsOf(b, runId), await eventsOf(a, runId));

  // A tab opened now replays the run: the same cards, settled the same way.
  const c = await page(profile, { label: "tab-c-later" });
  await signIn(c, server.url, "alice");
  await c.waitForSelector(`${runSel(runId)}[data-status="succeeded"]`);
  assert.deepEqual(await eventsOf(c, runId), await eventsOf(a, runId));
  for (const kind of ["approval", "input"]) {
    const later = await cardOf(c, runId, kind);
    const seen = await cardOf(a, runId, kind);
    assert.deepEqual(later, seen, `the replayed ${kind} card`);
  }
}, { shot: "ask-approve" });

browserTest("deny runs no tool; a tab opened while the question is open answers it from the replay", async ({ context, page, server }) => {
  const profile = await context();
  const a = await page(profile, { label: "tab-a" });
  await signIn(a, server.url, "alice");
  const runId = await startPreset(a, "ask");
  await waitCard(a, runId, "approval", "open");
  await a.click(`${cardSel(runId, "approval")} ${sel("deny-button")}`);
  await waitCard(a, runId, "approval", "denied");
  assert.equal((await cardOf(a, runId, "approval")).settled, "denied");

  // The script goes on to its question; tab B, opened only now, gets both from the replay.
  await waitCard(a, runId, "input", "open");
  const b = await page(profile, { label: "tab-b-later" });
  await signIn(b, server.url, "alice");
  await waitCard(b, runId, "input", "open");
  assert.deepEqual(await cardOf(b, runId, "approval"), await cardOf(a, runId, "approval"));
  assertAskForm(await cardOf(b, runId, "input"));
  await b.fill(`${cardSel(runId, "input")} [data-field="recipient"]`, "Grace");
  await b.click(`${cardSel(runId, "input")} ${sel("question-submit")}`);
  for (const p of [a, b]) {
    await waitCard(p, runId, "input", "answered");
    // Only what was filled, and the schema's default.
    assert.deepEqual(answerOf((await cardOf(p, runId, "input")).settled), { recipient: "Grace", copies: 1, urgent: false });
    assert.equal(await waitDone(p, runId), "succeeded");
    // A denied call sends no tool events: no tool card, ever.
    assert.deepEqual(await toolsOf(p, runId), []);
    assert.match(await p.textContent(`${runSel(runId)} [data-type="agent_completed"]`), /0 tool calls/);
  }
  const types = (await eventsOf(a, runId)).map((e) => e.type);
  assert.ok(!types.some((t) => t.startsWith("tool_")), `events ${types}`);
  assert.deepEqual(await eventsOf(b, runId), await eventsOf(a, runId));
}, { shot: "ask-deny" });

browserTest("a question no one answers expires: the card says so and takes no answer", async ({ page, server }) => {
  const p = await page();
  await signIn(p, server.url, "alice");
  // Records each question card's states, and its expiry text when it appeared.
  await p.evaluate(() => {
    window.__cards = {};
    const note = (c) => {
      const rec = (window.__cards[c.dataset.interruptId] ??= { states: [], expires: null });
      if (rec.states.at(-1) !== c.dataset.state) rec.states.push(c.dataset.state);
      rec.expires ??= c.querySelector('[data-testid="question-expires"]')?.textContent ?? null;
    };
    new MutationObserver(() => document.querySelectorAll('[data-testid="question-card"]').forEach(note))
      .observe(document.querySelector('[data-testid="runs"]'), { subtree: true, childList: true, attributes: true, attributeFilter: ["data-state"] });
  });
  const runId = await startPreset(p, "ask");
  // Each question is open half a second, then expires: the run goes on without the answers.
  assert.equal(await waitDone(p, runId), "succeeded");
  const cards = await p.evaluate(() => window.__cards);
  assert.deepEqual(Object.keys(cards).sort(), ["in_1", "in_2"]);
  for (const rec of Object.values(cards)) {
    assert.deepEqual(rec.states, ["open", "expired"]);
    // (Or already past its time, on a slow machine: the card still said when.)
    assert.match(rec.expires, /^(expires in 1 s|expiring…)$/);
  }
  for (const kind of ["approval", "input"]) {
    const card = await cardOf(p, runId, kind);
    assert.equal(card.state, "expired");
    assert.equal(card.settled, "expired");
    assert.equal(card.form, false);
  }
  // An expired approval is a no: the tool never ran.
  assert.deepEqual(await toolsOf(p, runId), []);
  assert.notEqual(await p.getAttribute(runSel(runId), "data-waiting"), "true");
}, { shot: "ask-expired", serverArgs: ["--interrupt-timeout-ms", "500"] });

browserTest("an answer that comes second gets a note, and the card shows the first one", async ({ page, server, defer }) => {
  // Tab B is behind a proxy that can hold what the server sends it: B still shows the card
  // open after tab A answered, and answers too.
  const proxy = await startProxy(server.port);
  defer(() => proxy.close());
  const a = await page(undefined, { label: "tab-a" });
  const b = await page(undefined, { label: "tab-b-slow" });
  await signIn(a, server.url, "alice");
  await signIn(b, proxy.url, "alice");
  const runId = await startPreset(a, "ask");
  const approval = cardSel(runId, "approval");
  await waitCard(a, runId, "approval", "open");
  await waitCard(b, runId, "approval", "open");

  proxy.hold();
  await a.click(`${approval} ${sel("approve-button")}`);
  await waitCard(a, runId, "approval", "approved");
  assert.equal((await cardOf(b, runId, "approval")).state, "open");
  await b.bringToFront();
  await b.fill(`${approval} ${sel("question-args")}`, '{"expr": "1+1"}');
  await b.click(`${approval} ${sel("approve-button")}`);
  // Its answer is on the way (the form is disabled while it is); then B hears everything.
  await b.waitForSelector(`${approval}[data-sending="true"]`);
  assert.equal(await b.isDisabled(`${approval} ${sel("approve-button")}`), true);
  assert.ok(proxy.release() > 0);

  await waitCard(b, runId, "approval", "approved");
  await b.waitForFunction((s) => document.querySelector(s)?.textContent, `${approval} ${sel("question-note")}`);
  const card = await cardOf(b, runId, "approval");
  assert.equal(card.settled, "approved", "A's answer, as it was");
  assert.equal(card.note, "Already settled: answered in another tab, or it expired.");
  assert.equal(card.error, "");
  // One tool call, with A's arguments; B's never ran.
  await b.waitForSelector(`${runSel(runId)} ${sel("tool-card")}[data-state="ok"]`);
  assert.deepEqual(await toolsOf(b, runId), [{ tool: "calculator", state: "ok", args: { expr: "6*7" }, result: '{"value":42}' }]);
  assert.deepEqual(await toolsOf(a, runId), await toolsOf(b, runId));
  assert.equal((await cardOf(a, runId, "approval")).note, "");

  // The run is still waiting for its question; cancelling it settles that one as expired.
  await waitCard(a, runId, "input", "open");
  await a.bringToFront();
  await a.click(`${runSel(runId)} ${sel("cancel-run")}`);
  for (const p of [a, b]) {
    await waitCard(p, runId, "input", "expired");
    assert.equal(await waitDone(p, runId), "cancelled");
  }
}, { shot: "ask-second-answer" });

browserTest("each kind of schema gets its form: one control, a select, a line of text, JSON", async ({ page, server }) => {
  const p = await page();
  await signIn(p, server.url, "alice");
  const runId = await startRun(p, "scripted", { steps: [
    { ask: "How many?", schema: { type: "integer", minimum: 1 } },
    { ask: "Which one?", schema: { enum: ["a", "b", 3] } },
    { ask: "Anything to add?" },
    { ask: "Which numbers?", schema: { type: "array", items: { type: "integer" }, minItems: 2 } },
    { ask: "Ok?", schema: { type: "boolean" } },
    { text: "done" },
  ] });
  const open = async (message) => {
    const q = `${runSel(runId)} ${sel("question-card")}[data-state="open"]`;
    await p.waitForSelector(q);
    assert.equal(await p.textContent(`${q} ${sel("question-message")}`), message);
    const inputs = await p.$$eval(`${q} ${sel("question-input")}`, (n) => n.map((i) => ({ kind: i.dataset.kind, field: i.dataset.field ?? null })));
    return { q, inputs };
  };
  const settled = async (id) => {
    await p.waitForSelector(`${runSel(runId)} ${sel("question-card")}[data-interrupt-id="${id}"][data-state="answered"]`);
    return p.textContent(`${runSel(runId)} [data-interrupt-id="${id}"] ${sel("question-settled")}`);
  };

  // A whole number: one control, labelled by the question; the schema refuses 0, takes 5.
  let { q, inputs } = await open("How many?");
  assert.deepEqual(inputs, [{ kind: "integer", field: null }]);
  assert.equal(await p.getByRole("spinbutton", { name: "How many?" }).count(), 1);
  await p.fill(`${q} ${sel("question-input")}`, "0");
  await p.click(`${q} ${sel("question-submit")}`);
  await p.waitForFunction((s) => document.querySelector(s)?.textContent.includes("minimum of 1"), `${q} ${sel("question-error")}`);
  await p.fill(`${q} ${sel("question-input")}`, "5");
  await p.click(`${q} ${sel("question-submit")}`);
  assert.equal(await settled("in_1"), "answered: 5");

  // An enum: a select of its values, which are sent as they are (3 as a number).
  ({ q, inputs } = await open("Which one?"));
  assert.deepEqual(inputs, [{ kind: "enum", field: null }]);
  assert.deepEqual(await p.$$eval(`${q} option`, (o) => o.map((x) => x.textContent)), ["choose…", "a", "b", "3"]);
  await p.selectOption(`${q} ${sel("question-input")}`, { label: "3" });
  await p.click(`${q} ${sel("question-submit")}`);
  assert.equal(await settled("in_2"), "answered: 3");

  // No schema: a line of text, sent as a string.
  ({ q, inputs } = await open("Anything to add?"));
  assert.deepEqual(inputs, [{ kind: "text", field: null }]);
  await p.fill(`${q} ${sel("question-input")}`, "<b>no</b>");
  await p.press(`${q} ${sel("question-input")}`, "Enter");
  assert.equal(await settled("in_3"), "answered: <b>no</b>");
  assert.equal(await p.$$eval(`${runSel(runId)} b`, (n) => n.length), 0, "text, not HTML");

  // More than a form can say: JSON, checked here for syntax (nothing is sent) and by the
  // server for the schema.
  ({ q, inputs } = await open("Which numbers?"));
  assert.deepEqual(inputs, [{ kind: "json", field: null }]);
  assert.deepEqual(JSON.parse(await p.textContent(`${q} ${sel("question-schema")}`)), { type: "array", items: { type: "integer" }, minItems: 2 });
  await p.fill(`${q} ${sel("question-input")}`, "[1, 2");
  await p.click(`${q} ${sel("question-submit")}`);
  await p.waitForFunction((s) => document.querySelector(s)?.textContent.startsWith("The answer is not valid JSON"), `${q} ${sel("question-error")}`);
  assert.equal(await p.getAttribute(`${q} ${sel("question-input")}`, "aria-invalid"), "true");
  await p.fill(`${q} ${sel("question-input")}`, "[1]");
  await p.click(`${q} ${sel("question-submit")}`);
  await p.waitForFunction((s) => document.querySelector(s)?.textContent.startsWith("the response does not fit"), `${q} ${sel("question-error")}`);
  assert.match(await p.textContent(`${q} ${sel("question-error")}`), /\[1\] has less than 2 items/);
  await p.fill(`${q} ${sel("question-input")}`, "[1, 2]");
  await p.click(`${q} ${sel("question-submit")}`);
  assert.equal(await settled("in_4"), "answered: [1,2]");

  // A boolean: a checkbox; unchecked is false.
  ({ q, inputs } = await open("Ok?"));
  assert.deepEqual(inputs, [{ kind: "boolean", field: null }]);
  await p.click(`${q} ${sel("question-submit")}`);
  assert.equal(await settled("in_5"), "answered: false");
  assert.equal(await waitDone(p, runId), "succeeded");
}, { shot: "ask-forms" });
