// The official openai npm SDK through sluicegate: one answer whole, one streamed.
// Run by tests/test_openai_node.py; prints one JSON line for it to check.
//   SLUICEGATE_BASE_URL=http://127.0.0.1:8080/v1 SEED=7 node tests/node/chat.mjs
import { client, model, seed } from "./setup.mjs";

const messages = [{ role: "user", content: "双十一预售什么时候开始?" }];

const whole = await client.chat.completions.create({ model, messages, seed });

const stream = await client.chat.completions.create({
  model,
  messages,
  seed,
  stream: true,
  stream_options: { include_usage: true },
});
const parts = [];
let usage = null;
let chunks = 0;
for await (const chunk of stream) {
  chunks += 1;
  if (chunk.choices.length > 0) parts.push(chunk.choices[0].delta.content ?? "");
  if (chunk.usage) usage = chunk.usage;
}

console.log(
  JSON.stringify({
    non_stream: whole.choices[0].message.content,
    non_stream_model: whole.model,
    non_stream_usage: whole.usage,
    stream: parts.join(""),
    stream_usage: usage,
    stream_chunks: chunks,
  }),
);
