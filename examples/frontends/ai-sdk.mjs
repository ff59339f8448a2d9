// agentcast from the Vercel AI SDK: DefaultChatTransport (what useChat sends and reads with)
// and readUIMessageStream (how useChat builds the assistant message). Prints the message's
// parts as they grow, then the final ones.
//
//   node ai-sdk.mjs [SERVER]      # SERVER defaults to http://localhost:8080
import { DefaultChatTransport, readUIMessageStream } from "ai";
import { bearerToken } from "./token.mjs";

const server = process.argv[2] ?? "http://localhost:8080";
const transport = new DefaultChatTransport({
  api: `${server}/v1/ai-sdk/scripted`,
  headers: { Authorization: `Bearer ${await bearerToken(server)}` },
  // useChat's `body` option: agentcast takes the run's input from `input` (else the last
  // user message's text).
  body: { input: { steps: [{ think: "adding" }, { tool: "calculator", args: { expr: "2+2" } }, { text: "4" }] } },
});
const stream = await transport.sendMessages({
  chatId: "example-chat",
  messages: [{ id: "q1", role: "user", parts: [{ type: "text", text: "what is 2+2?" }] }],
  trigger: "submit-message",
  messageId: undefined,
  abortSignal: undefined,
});
let message;
for await (message of readUIMessageStream({ stream, onError: (e) => console.error(`run failed: ${e.message}`) })) {
  console.log(`${message.parts.length} parts`);
}
for (const p of message.parts) {
  if (p.type === "dynamic-tool") console.log(`tool ${p.toolName} ${JSON.stringify(p.input)} → ${p.state} ${JSON.stringify(p.output)}`);
  else console.log(`${p.type}: ${p.text}`);
}
