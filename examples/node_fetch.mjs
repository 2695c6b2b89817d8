// The onboarding guide in JavaScript (Node 20+, built-in fetch only):
//   IIR_BASE_URL=http://localhost:8000 node examples/node_fetch.mjs
// Creates a key (from a trusted address), lists models, chats, streams, and embeds.
const base = process.env.IIR_BASE_URL ?? "http://localhost:8000";
const model = process.env.IIR_MODEL ?? "local/smollm2-135m";

async function call(path, { method = "POST", body, headers = {} } = {}) {
  const res = await fetch(`${base}${path}`, {
    method,
    headers: { "Content-Type": "application/json", ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${await res.text()}`);
  return res;
}

const { api_key: apiKey, priority } = await (await call("/api/v1/apikeys", {
  body: { description: "js example", priority: 3 },
})).json();
const auth = { Authorization: `Bearer ${apiKey}` };

const models = await (await call("/v1/models", { method: "GET", headers: auth })).json();

const chat = await (await call("/v1/chat/completions", {
  headers: auth,
  body: { model, max_tokens: 16, temperature: 0, messages: [{ role: "user", content: "Hello!" }] },
})).json();

// Streaming: read the SSE body chunk by chunk until `data: [DONE]`.
const streamRes = await call("/v1/chat/completions", {
  headers: auth,
  body: { model, max_tokens: 16, temperature: 0, stream: true, messages: [{ role: "user", content: "Hi there" }] },
});
let streamed = "";
let sawDone = false;
let buffer = "";
const decoder = new TextDecoder();
for await (const part of streamRes.body) {
  buffer += decoder.decode(part, { stream: true });
  let cut;
  while ((cut = buffer.indexOf("\n\n")) >= 0) {
    const event = buffer.slice(0, cut);
    buffer = buffer.slice(cut + 2);
    const data = event.replace(/^data: /, "");
    if (data === "[DONE]") { sawDone = true; continue; }
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(`stream error: ${chunk.error.message}`);
    streamed += chunk.choices[0]?.delta?.content ?? "";
  }
}

const emb = await (await call("/v1/embeddings", {
  headers: auth,
  body: { model: "local/minilm-l6-v2", input: "hello world" },
})).json();

console.log(JSON.stringify({
  priority,
  models: models.data.map((m) => m.id),
  chat: chat.choices[0].message.content,
  streamed,
  sawDone,
  embeddingLength: emb.data[0].embedding.length,
}));
