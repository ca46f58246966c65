// Drives the proxy's /v1 surface with the official Node SDK and prints what it saw as one JSON line.
// Usage: PROXY_BASE_URL=http://127.0.0.1:3002/v1 PROXY_KEY=... node sdk_check.mjs
import OpenAI from "openai";

const baseURL = process.env.PROXY_BASE_URL;
const client = new OpenAI({ baseURL, apiKey: process.env.PROXY_KEY, maxRetries: 0 });
const out = {};

const completion = await client.chat.completions.create({
  model: "gpt-4o-mini",
  messages: [{ role: "user", content: "Say hi" }],
});
out.chat = completion.choices[0].message.content;

let streamed = "";
const chunks = await client.chat.completions.create({
  model: "gpt-4o-mini",
  messages: [{ role: "user", content: "Say hi" }],
  stream: true,
});
for await (const chunk of chunks) streamed += chunk.choices[0]?.delta?.content ?? "";
out.chatStream = streamed;

out.responseText = (await client.responses.create({ model: "gpt-4o", input: "x" })).output_text;
const stream = client.responses.stream({ model: "gpt-4o", input: "x" });
const types = [];
for await (const event of stream) types.push(event.type);
out.responseStreamText = (await stream.finalResponse()).output_text;
out.responseEventTypes = types;

const embedding = await client.embeddings.create({ model: "text-embedding-3-small", input: "fox" });
out.embedding = Array.from(embedding.data[0].embedding);

// A per-call timeout goes upstream's way as X-Stainless-Timeout (whole seconds).
const models = [];
for await (const model of client.models.list({ timeout: 30_000 })) models.push(model.id);
out.models = models;

try {
  await new OpenAI({ baseURL, apiKey: "wrong", maxRetries: 0 }).models.list();
  out.wrongKey = "no error";
} catch (err) {
  out.wrongKey = { name: err.constructor.name, status: err.status, code: err.code };
}

console.log(JSON.stringify(out));
