// The official openai JS/TS SDK, unmodified, against IIR:
//   cd examples && npm ci && IIR_BASE_URL=http://localhost:8000 IIR_API_KEY=iir-... node openai_sdk.mjs
import OpenAI from "openai";

const base = process.env.IIR_BASE_URL ?? "http://localhost:8000";
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: process.env.IIR_API_KEY, maxRetries: 0 });
const model = process.env.IIR_MODEL ?? "local/smollm2-135m";
const ask = [{ role: "user", content: "What is the capital of France?" }];

const models = [];
for await (const m of client.models.list()) models.push(m.id);

const chat = await client.chat.completions.create({ model, messages: ask, max_tokens: 12, temperature: 0 });

let streamed = "";
let usage = null;
const stream = await client.chat.completions.create({
  model, messages: ask, max_tokens: 12, temperature: 0, stream: true, stream_options: { include_usage: true },
});
for await (const chunk of stream) {
  streamed += chunk.choices[0]?.delta?.content ?? "";
  if (chunk.usage) usage = chunk.usage;
}

const emb = await client.embeddings.create({ model: "local/minilm-l6-v2", input: ["hello", "world"] });

// Structured output: the answer is held to the schema (llama.cpp grammar on local models).
const city = await client.chat.completions.create({
  model, max_tokens: 60, temperature: 0,
  messages: [{ role: "user", content: "Describe Lisbon as a record." }],
  response_format: { type: "json_schema", json_schema: { name: "city", strict: true, schema: {
    type: "object", additionalProperties: false, required: ["name", "coastal"],
    properties: { name: { type: "string", maxLength: 40 }, coastal: { type: "boolean" } } } } },
});

// A tool call: tool_choice "required" (or a named tool) always gives a call to a declared function.
const weather = await client.chat.completions.create({
  model, max_tokens: 60, temperature: 0, tool_choice: "required",
  messages: [{ role: "user", content: "What's the weather in Oslo?" }],
  tools: [{ type: "function", function: { name: "get_weather", description: "Current weather in a city",
    parameters: { type: "object", additionalProperties: false, required: ["city"],
      properties: { city: { type: "string", maxLength: 40 } } } } }],
});

// The Responses API: a response, its typed events, a structured answer, a function call, a follow-up.
const respond = (over) => client.responses.create({ model, max_output_tokens: 12, temperature: 0, ...over });
const response = await respond({ input: "What is the capital of France?", instructions: "Be brief." });
const followUp = await respond({ input: "And of Spain?", previous_response_id: response.id });
const eventTypes = [];
let responseStreamed = "";
for await (const event of await respond({ input: "Count to three", stream: true })) {
  eventTypes.push(event.type);
  if (event.type === "response.output_text.delta") responseStreamed += event.delta;
}
const helper = client.responses.stream({ model, input: "Count to three", max_output_tokens: 12, temperature: 0 });
const helperFinal = await helper.finalResponse();
const cityResponse = await respond({
  input: "Describe Lisbon as a record.", max_output_tokens: 60,
  text: { format: { type: "json_schema", name: "city", strict: true, schema: {
    type: "object", additionalProperties: false, required: ["name", "coastal"],
    properties: { name: { type: "string", maxLength: 40 }, coastal: { type: "boolean" } } } } },
});
const callResponse = await respond({
  input: "What's the weather in Oslo?", max_output_tokens: 60, tool_choice: "required",
  tools: [{ type: "function", name: "get_weather", description: "Current weather in a city",
    parameters: { type: "object", additionalProperties: false, required: ["city"],
      properties: { city: { type: "string", maxLength: 40 } } } }],
});
const cityEvents = client.responses.stream({
  model, input: "Describe Lisbon as a record.", max_output_tokens: 60, temperature: 0,
  text: { format: { type: "json_schema", name: "city", strict: true, schema: {
    type: "object", additionalProperties: false, required: ["name", "coastal"],
    properties: { name: { type: "string", maxLength: 40 }, coastal: { type: "boolean" } } } } },
});
const cityFromEvents = JSON.parse((await cityEvents.finalResponse()).output_text);
const remoteModel = process.env.IIR_REMOTE_MODEL;
const remote = remoteModel ? await respond({ model: remoteModel, input: "hello from javascript" }) : null;

// The same two, streamed: the SDK's stream helpers accumulate them into a final completion.
const cityStream = client.chat.completions.stream({
  model, max_tokens: 60, temperature: 0,
  messages: [{ role: "user", content: "Describe Lisbon as a record." }],
  response_format: { type: "json_schema", json_schema: { name: "city", strict: true, schema: {
    type: "object", additionalProperties: false, required: ["name", "coastal"],
    properties: { name: { type: "string", maxLength: 40 }, coastal: { type: "boolean" } } } } },
});
const cityStreamed = JSON.parse((await cityStream.finalChatCompletion()).choices[0].message.content);
const weatherStream = client.chat.completions.stream({
  model, max_tokens: 60, temperature: 0, tool_choice: "required",
  messages: [{ role: "user", content: "What's the weather in Oslo?" }],
  tools: [{ type: "function", function: { name: "get_weather", description: "Current weather in a city",
    parameters: { type: "object", additionalProperties: false, required: ["city"],
      properties: { city: { type: "string", maxLength: 40 } } } } }],
});
const weatherStreamed = (await weatherStream.finalChatCompletion()).choices[0];

let notFound = null;
try {
  await client.chat.completions.create({ model: "nobody/none", messages: ask });
} catch (err) {
  notFound = { status: err.status, code: err.code };
}

console.log(JSON.stringify({
  models,
  chat: chat.choices[0].message.content,
  streamed,
  usage,
  embeddings: emb.data.map((d) => d.embedding.length),
  structured: JSON.parse(city.choices[0].message.content),
  toolCall: weather.choices[0].message.tool_calls[0].function,
  toolFinish: weather.choices[0].finish_reason,
  structuredStreamed: cityStreamed,
  toolCallStreamed: weatherStreamed.message.tool_calls[0].function,
  toolFinishStreamed: weatherStreamed.finish_reason,
  notFound,
  responses: {
    text: response.output_text,
    usage: response.usage,
    followUp: { previous: followUp.previous_response_id === response.id, text: followUp.output_text },
    eventTypes,
    streamed: responseStreamed,
    helper: helperFinal.output_text,
    structured: JSON.parse(cityResponse.output_text),
    structuredStreamed: cityFromEvents,
    call: callResponse.output.find((item) => item.type === "function_call"),
    remote: remote && { model: remote.model, text: remote.output_text },
  },
}));
