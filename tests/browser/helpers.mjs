// Shared by the browser tests: a real agentcast server per test, the system Chromium, a TCP
// proxy that can cut connections, screenshots, and small page helpers.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync, existsSync, readFileSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { after, test } from "node:test";
import { chromium } from "playwright-core";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
export const BIN = path.resolve(ROOT, process.env.AGENTCAST_BIN || "target/debug/agentcast");
export const SCREENSHOTS = path.join(ROOT, "target/browser-screenshots");
export const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

/** Starts `agentcast` in dev mode on a free port; resolves once it logs where it listens. */
export async function startServer(extraArgs = []) {
  if (!existsSync(BIN)) throw new Error(`no agentcast binary at ${BIN}: run cargo build`);
  // Dev mode (no secret) so the page can sign in; no other AGENTCAST_* setting from outside.
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("AGENTCAST_")));
  env.RUST_LOG = process.env.RUST_LOG || "info";
  const proc = spawn(BIN, ["--bind", "127.0.0.1:0", ...extraArgs], {
    env,
    stdio: ["ignore", "ignore", "pipe"],
  });
  let log = "";
  const port = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`agentcast did not start in 20 s:\n${log}`)), 20_000);
    proc.stderr.setEncoding("utf8");
    proc.stderr.on("data", (chunk) => {
      log += chunk;
      const m = /agentcast listening on \[127\.0\.0\.1:(\d+)/.exec(log);
      if (m) {
        clearTimeout(timer);
        resolve(Number(m[1]));
      }
    });
    proc.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`agentcast exited with ${code} before listening:\n${log}`));
    });
  });
  const exited = new Promise((resolve) => proc.on("exit", resolve));
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    log: () => log,
    /** SIGTERM (orderly stop), then SIGKILL if it takes more than 10 s; or `signal` at once. */
    async stop(signal = "SIGTERM") {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      proc.kill(signal);
      const killer = setTimeout(() => proc.kill("SIGKILL"), 10_000);
      await exited;
      clearTimeout(killer);
    },
  };
}

/** The page's files: the binary embeds them (src/web.rs), so it serves them as they were when
 *  it was built. */
const WEB_ASSETS = { "/": "index.html", "/agentcast.js": "agentcast.js", "/app.js": "app.js", "/style.css": "style.css" };
const WEB_TYPES = { html: "text/html; charset=utf-8", js: "text/javascript; charset=utf-8", css: "text/css; charset=utf-8" };
/** `AGENTCAST_WEB_DIR=web` serves the page's files from that directory (relative to the
 *  repository) instead of the binary's copies: for working on the page without a rebuild. */
export const WEB_DIR = process.env.AGENTCAST_WEB_DIR ? path.resolve(ROOT, process.env.AGENTCAST_WEB_DIR) : null;

let assetsChecked = null;
/** Without AGENTCAST_WEB_DIR, checks once that the server serves web/ as it is on disk: a
 *  binary built before the page was edited would otherwise test the old page. */
async function checkAssets(url) {
  if (WEB_DIR) return;
  assetsChecked ??= (async () => {
    const stale = [];
    for (const [route, file] of Object.entries(WEB_ASSETS)) {
      const served = await (await fetch(`${url}${route}`)).text();
      if (served !== readFileSync(path.join(ROOT, "web", file), "utf8")) stale.push(`web/${file}`);
    }
    if (stale.length) {
      throw new Error(`${BIN} serves an older ${stale.join(", ")} (the page is embedded when it is built): ` +
        "rebuild it (cargo build), or set AGENTCAST_WEB_DIR=web to serve web/ from disk");
    }
  })();
  await assetsChecked;
}

/** With AGENTCAST_WEB_DIR, makes `context` get the page's files from there. */
async function routeAssets(context) {
  if (!WEB_DIR) return;
  await context.route((url) => Object.hasOwn(WEB_ASSETS, url.pathname), (route) => {
    const file = WEB_ASSETS[new URL(route.request().url()).pathname];
    route.fulfill({
      status: 200,
      headers: { "Content-Type": WEB_TYPES[file.split(".").pop()], "Cache-Control": "no-cache" },
      body: readFileSync(path.join(WEB_DIR, file)),
    });
  });
}

export async function launchBrowser() {
  if (!existsSync(CHROMIUM)) throw new Error(`no Chromium at ${CHROMIUM}: apt-get install chromium`);
  return chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      // A page whose document came from a route (AGENTCAST_WEB_DIR) is not on the loopback
      // address as far as Chromium knows: let it open its WebSocket to the local server anyway.
      ...(WEB_DIR ? ["--disable-features=LocalNetworkAccessChecks"] : []),
    ],
  });
}

/** A page whose uncaught errors and console errors are collected in `problems` (the tests
 *  expect none), except console errors matching `ignore`. */
export async function newPage(context, problems, ignore = null) {
  const page = await context.newPage();
  page.on("pageerror", (e) => problems.push(`pageerror: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error" && !(ignore && ignore.test(m.text()))) problems.push(`console error: ${m.text()}`);
  });
  return page;
}

export async function screenshot(page, name) {
  mkdirSync(SCREENSHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SCREENSHOTS, `${name}.png`), fullPage: true });
}

export const sel = (testid, extra = "") => `[data-testid="${testid}"]${extra}`;
export const runSel = (runId) => `[data-testid="run"][data-run-id="${runId}"]`;

/** Opens the page and signs in as `user` through the dev token route. */
export async function signIn(page, baseUrl, user) {
  await page.bringToFront();
  await page.goto(`${baseUrl}/`);
  await page.fill(sel("signin-user"), user);
  await page.click(sel("signin-button"));
  await page.waitForSelector(`${sel("connection-status")}[data-state="open"]`);
  await page.waitForSelector(`${sel("agent-select")} option[value="scripted"]`, { state: "attached" });
}

/** Starts a run from the form; resolves with its run_id once its card is on the page. */
export async function startRun(page, agent, input) {
  // Clicks wait for animation frames, which a background tab does not get.
  await page.bringToFront();
  const before = await page.getAttribute(sel("start-form"), "data-last-run-id");
  await page.selectOption(sel("agent-select"), agent);
  await page.fill(sel("run-input"), JSON.stringify(input));
  await page.click(sel("start-run"));
  return afterStart(page, before);
}

/** Clicks a preset and starts it; resolves with the run_id. */
export async function startPreset(page, preset) {
  await page.bringToFront();
  const before = await page.getAttribute(sel("start-form"), "data-last-run-id");
  await page.click(sel(`preset-${preset}`));
  await page.click(sel("start-run"));
  return afterStart(page, before);
}

async function afterStart(page, before) {
  const handle = await page.waitForFunction(
    ([prev]) => {
      const err = document.querySelector('[data-testid="start-error"]').textContent;
      if (err) return { error: err };
      const id = document.querySelector('[data-testid="start-form"]').dataset.lastRunId;
      return id && id !== prev ? { id } : null;
    },
    [before],
    { polling: 50 },
  );
  const { id, error } = await handle.jsonValue();
  if (error) throw new Error(`start refused: ${error}`);
  await page.waitForSelector(runSel(id));
  return id;
}

/** Waits until the run's final status is shown; resolves with it. */
export async function waitDone(page, runId, timeout = 30_000) {
  await page.waitForSelector(`${runSel(runId)}:not([data-status="running"])`, { timeout });
  return page.getAttribute(runSel(runId), "data-status");
}

/** The run's rendered events in page order: [{seq, type}]. */
export function eventsOf(page, runId) {
  return page.$$eval(`${runSel(runId)} [data-testid="event"]`, (nodes) =>
    nodes.map((n) => ({ seq: Number(n.dataset.seq), type: n.dataset.type })));
}

/** Every rendered event on the page, whatever the run. */
export function allEvents(page) {
  return page.$$eval('[data-testid="event"]', (nodes) =>
    nodes.map((n) => ({ seq: Number(n.dataset.seq), type: n.dataset.type, run: n.closest('[data-testid="run"]').dataset.runId })));
}

/**
 * A TCP proxy in front of `port`: the page is loaded through it, so its WebSocket goes through
 * it too. `cut()` destroys every proxied connection (as a network failure or a server that
 * drops sockets would); `refuseFor(ms)` makes new connections fail for a while; `hold()` keeps
 * what the server sends from the page (a slow network: the page's own frames still go out)
 * until `release()`.
 */
export async function startProxy(targetPort) {
  const sockets = new Set();
  let refuseUntil = 0;
  let target = targetPort;
  let accepted = 0;
  let held = null;
  const server = net.createServer((client) => {
    if (Date.now() < refuseUntil) {
      client.destroy();
      return;
    }
    accepted++;
    const upstream = net.connect(target, "127.0.0.1");
    sockets.add(client);
    sockets.add(upstream);
    const drop = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on("error", drop).on("close", drop);
    upstream.on("error", drop).on("close", drop);
    client.pipe(upstream);
    upstream.on("data", (chunk) => {
      if (held) held.push([client, chunk]);
      else client.write(chunk);
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = server.address().port;
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    get accepted() {
      return accepted;
    },
    set target(p) {
      target = p;
    },
    cut() {
      const n = sockets.size;
      for (const s of sockets) s.destroy();
      sockets.clear();
      return n;
    },
    refuseFor(ms) {
      refuseUntil = Date.now() + ms;
    },
    hold() {
      held ??= [];
    },
    release() {
      const chunks = held ?? [];
      held = null;
      for (const [client, chunk] of chunks) if (!client.destroyed) client.write(chunk);
      return chunks.length;
    },
    async close() {
      this.cut();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

/** Checks that `seqs` is exactly 1..n. */
export function isOneToN(seqs) {
  const sorted = [...seqs].sort((a, b) => a - b);
  return sorted.every((s, i) => s === i + 1);
}

let browser = null;
after(async () => {
  if (browser) await browser.close();
});

/**
 * A browser test: its own server (dev mode, free port), a browser shared by the file, a
 * screenshot of every page it opened (target/browser-screenshots/SHOT[-LABEL].png), no page
 * errors, and the servers stopped at the end. `fn` gets {server, servers, browser, problems,
 * context(), page(context, {label, ignore}), defer(fn)}.
 */
export function browserTest(name, fn, { timeout = 60_000, serverArgs = [], shot = null } = {}) {
  test(name, { timeout }, async () => {
    browser ??= await launchBrowser();
    const server = await startServer(serverArgs);
    try {
      await checkAssets(server.url);
    } catch (e) {
      await server.stop();
      throw e;
    }
    const problems = [];
    const contexts = [];
    const pages = [];
    const deferred = [];
    const env = {
      server,
      browser,
      problems,
      /** A new browser context (a browser profile: its own sessionStorage); `options` go to
       *  browser.newContext (e.g. a smaller viewport). */
      async context(options = {}) {
        const c = await browser.newContext({ viewport: { width: 1400, height: 1000 }, ...options });
        contexts.push(c);
        await routeAssets(c);
        return c;
      },
      /** A new page (tab) in `context` (default: a new context); `label` names its
       *  screenshot, `ignore` is a regex of console errors that are expected. */
      async page(context, { label, ignore } = {}) {
        const p = await newPage(context ?? (await env.context()), problems, ignore);
        pages.push({ p, label: label ?? String(pages.length + 1) });
        return p;
      },
      servers: [server],
      /** Runs `fn` at the end, after the screenshots (e.g. closing a proxy the page uses). */
      defer(fn) {
        deferred.push(fn);
      },
    };
    const slug = shot ?? name.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 60);
    try {
      await fn(env);
      assert.deepEqual(problems, [], "the page logged errors");
    } catch (e) {
      e.message += `\n--- server log (tail) ---\n${env.servers.map((s) => s.log().slice(-4000)).join("\n---\n")}`;
      throw e;
    } finally {
      for (const { p, label } of pages) {
        await screenshot(p, pages.length > 1 ? `${slug}-${label}` : slug).catch(() => {});
      }
      for (const c of contexts) await c.close().catch(() => {});
      for (const fn of deferred) await fn();
      for (const s of env.servers) await s.stop();
    }
  });
}
