// The Vercel AI SDK's default OpenAI provider through sluicegate: `openai(model)` speaks the
// Responses API. generateText and streamText; run by tests/test_openai_node.py, prints one
// JSON line for it to check. (`seed` is not a Responses API parameter: the mock's seed 0.)
//   SLUICEGATE_BASE_URL=http://127.0.0.1:8080/v1 node tests/node/ai-sdk.mjs
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, streamText } from "ai";
import { baseURL, model as name } from "./setup.mjs";

globalThis.AI_SDK_LOG_WARNINGS = false; // they go to stdout, which carries the answer
const openai = createOpenAI({ baseURL, apiKey: "client-key-unused" });
const model = openai(name);
const prompt = "双十一预售什么时候开始?";

const whole = await generateText({ model, prompt, maxRetries: 0 });
const stream = streamText({ model, prompt, maxRetries: 0 });
const parts = [];
for await (const part of stream.textStream) parts.push(part);
const usage = await stream.usage;

console.log(
  JSON.stringify({
    non_stream: whole.text,
    non_stream_output_tokens: whole.usage.outputTokens,
    stream: parts.join(""),
    stream_output_tokens: usage.outputTokens,
    finish: await stream.finishReason,
  }),
);
