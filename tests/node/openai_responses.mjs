// The official openai node SDK's Responses API against a chatgate gateway: a whole response, a
// stream (its events and finalResponse), a chained follow-up, retrieval and deletion.
// OPENAI_BASE_URL, OPENAI_API_KEY and MODEL point it there. Prints one JSON line of what the SDK
// parsed; tests/plugins/test_openai_responses.py checks it.
import OpenAI from "openai";

const client = new OpenAI({ maxRetries: 0 });
const model = process.env.MODEL;

const whole = await client.responses.create({ model, input: "Hello from node", instructions: "Be brief." });
const stream = client.responses.stream({ model, input: "Stream please", previous_response_id: whole.id });
const kinds = [];
let streamed = "";
for await (const event of stream) {
  kinds.push(event.type);
  if (event.type === "response.output_text.delta") streamed += event.delta;
}
const final = await stream.finalResponse();
const retrieved = await client.responses.retrieve(final.id);
const items = [];
for await (const item of client.responses.inputItems.list(whole.id)) items.push(item.id);
await client.responses.delete(whole.id);
let notFound = null;
try {
  await client.responses.retrieve(whole.id);
} catch (error) {
  notFound = { name: error.constructor.name, status: error.status };
}

console.log(
  JSON.stringify({
    whole: { id: whole.id, text: whole.output_text, status: whole.status },
    streamed,
    kinds: [kinds[0], kinds[kinds.length - 1]],
    // The stream's finalResponse() has no output_text unless the server sends one (OpenAI does not).
    final: { id: final.id, text: final.output[0].content[0].text, previous: final.previous_response_id },
    retrieved: retrieved.output_text,
    items: items.length,
    notFound,
  }),
);
