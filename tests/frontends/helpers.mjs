// Shared by the frontend tests: a real agentcast server per test file (dev mode, free port)
// and a dev token for a user.

import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
export const BIN = path.resolve(ROOT, process.env.AGENTCAST_BIN || "target/debug/agentcast");

/** Starts `agentcast serve` in dev mode on a free port; resolves once it logs where it listens. */
export async function startServer(extraArgs = []) {
  if (!existsSync(BIN)) throw new Error(`no agentcast binary at ${BIN}: run cargo build`);
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("AGENTCAST_")));
  env.RUST_LOG = process.env.RUST_LOG || "info";
  const proc = spawn(BIN, ["serve", "--bind", "127.0.0.1:0", ...extraArgs], {
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
    url: `http://127.0.0.1:${port}`,
    log: () => log,
    async stop() {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      proc.kill("SIGTERM");
      const killer = setTimeout(() => proc.kill("SIGKILL"), 10_000);
      await exited;
      clearTimeout(killer);
    },
  };
}

/** A dev-mode token for `user`. */
export async function token(server, user) {
  const res = await fetch(`${server.url}/v1/dev/token`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ user }),
  });
  if (!res.ok) throw new Error(`dev token: HTTP ${res.status}`);
  return (await res.json()).token;
}

/** The scripted agent's input for a run that thinks, calls the calculator and answers. */
export const CALCULATE = {
  steps: [{ think: "adding" }, { tool: "calculator", args: { expr: "2+2" } }, { text: "4" }],
};
