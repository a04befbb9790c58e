// What every script here shares: the proxy's /v1 URL (SLUICEGATE_BASE_URL), the seed, the
// route's model name, and an openai client for them.
import OpenAI from "openai";

export const baseURL = process.env.SLUICEGATE_BASE_URL;
if (!baseURL) {
  console.error("set SLUICEGATE_BASE_URL to the proxy's /v1 URL");
  process.exit(2);
}
export const seed = Number(process.env.SEED ?? "7");
export const model = process.env.MODEL ?? "support-bot";

// The client's key is never forwarded upstream; any value will do.
export const client = new OpenAI({
  baseURL,
  apiKey: "client-key-unused",
  maxRetries: 0,
  timeout: 20_000,
});
