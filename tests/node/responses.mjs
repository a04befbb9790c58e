// The official openai npm SDK's Responses API through sluicegate: one answer whole, one
// streamed, a function call and structured output. Run by tests/test_openai_node.py; prints
// one JSON line for it to check.
//   SLUICEGATE_BASE_URL=http://127.0.0.1:8080/v1 SEED=7 node tests/node/responses.mjs
import { client, model, seed } from "./setup.mjs";

const input = "双十一预售什么时候开始?";

const whole = await client.responses.create({ model, input, seed });

const stream = await client.responses.create({ model, input, seed, stream: true });
const deltas = [];
const types = [];
let completed = null;
for await (const event of stream) {
  types.push(event.type);
  if (event.type === "response.output_text.delta") deltas.push(event.delta);
  if (event.type === "response.completed") completed = event.response;
}

const tools = [
  {
    type: "function",
    name: "get_weather",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
    strict: false,
  },
];
const called = await client.responses.create({ model, input: "weather in Paris?", tools });

const schema = {
  type: "object",
  properties: { city: { type: "string" }, celsius: { type: "integer" } },
  required: ["city", "celsius"],
  additionalProperties: false,
};
const structured = await client.responses.create({
  model,
  input: "weather?",
  text: { format: { type: "json_schema", name: "weather", schema, strict: true } },
});

console.log(
  JSON.stringify({
    non_stream: whole.output_text,
    non_stream_model: whole.model,
    non_stream_usage: whole.usage,
    stream: deltas.join(""),
    stream_first: types[0],
    stream_last: types[types.length - 1],
    stream_usage: completed?.usage ?? null,
    call: called.output[0],
    structured: JSON.parse(structured.output_text),
  }),
);
