// The bearer token the examples use: $AGENTCAST_TOKEN, else (dev mode) one for "alice" from
// POST /v1/dev/token.
export async function bearerToken(server) {
  if (process.env.AGENTCAST_TOKEN) return process.env.AGENTCAST_TOKEN;
  const res = await fetch(`${server}/v1/dev/token`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ user: "alice" }),
  });
  if (!res.ok) throw new Error(`no dev token (HTTP ${res.status}): set AGENTCAST_TOKEN`);
  return (await res.json()).token;
}
