// The official openai npm SDK, with its default retries, against a route whose upstream always
// fails. Run by tests/test_client_retries.py; prints what the SDK got in the end.
//   SLUICEGATE_BASE_URL=http://127.0.0.1:8080/v1 MODEL=r FAULT='{"status":429}' TAG=t node tests/node/retries.mjs
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.SLUICEGATE_BASE_URL, apiKey: "unused", timeout: 20_000 });
try {
  await client.chat.completions.create(
    {
      model: process.env.MODEL,
      messages: [{ role: "user", content: "还有货吗?" }],
      fault: JSON.parse(process.env.FAULT), // the mock upstream's knobs; the proxy passes them on
    },
    { headers: { "x-request-id": process.env.TAG } },
  );
  console.error("expected an error");
  process.exit(1);
} catch (error) {
  if (!(error instanceof OpenAI.APIError) || error.status === undefined) throw error;
  const header = (name) => error.headers?.get(name) ?? null;
  console.log(
    JSON.stringify({
      status: error.status,
      should_retry: header("x-should-retry"),
      retry_after: header("retry-after"),
    }),
  );
}
