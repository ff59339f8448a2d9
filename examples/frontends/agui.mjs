// agentcast from AG-UI's own client, @ag-ui/client (what CopilotKit's runtime uses for an
// AG-UI agent): runs a scripted agent that thinks, calls a tool and answers, and prints the
// messages the client assembled.
//
//   node agui.mjs [SERVER]        # SERVER defaults to http://localhost:8080
import { HttpAgent } from "@ag-ui/client";
import { bearerToken } from "./token.mjs";

const server = process.argv[2] ?? "http://localhost:8080";
const agent = new HttpAgent({
  url: `${server}/v1/agui/scripted`,
  headers: { Authorization: `Bearer ${await bearerToken(server)}` },
});
agent.addMessage({ id: "q1", role: "user", content: "what is 2+2?" });
await agent.runAgent(
  {
    // agentcast takes the run's input from forwardedProps.input (else the last user message).
    forwardedProps: {
      input: { steps: [{ think: "adding" }, { tool: "calculator", args: { expr: "2+2" } }, { text: "4" }] },
    },
  },
  { onRunErrorEvent: ({ event }) => console.error(`run failed: ${event.message}`) },
);
for (const m of agent.messages) {
  const calls = (m.toolCalls ?? []).map((c) => ` ${c.function.name}(${c.function.arguments})`).join("");
  console.log(`${m.role}: ${m.content ?? ""}${calls}`);
}
