// The official @anthropic-ai/sdk against a chatgate gateway: a whole message, then a stream.
// Only the environment points it there: ANTHROPIC_BASE_URL, ANTHROPIC_API_KEY; MODEL names the model.
// Prints one JSON line of what the SDK parsed; tests/plugins/test_anthropic_messages.py checks it.
import Anthropic from "@anthropic-ai/sdk";

const client = new Anthropic({ maxRetries: 0 });
const model = process.env.MODEL;
const messages = [{ role: "user", content: "Hello from node" }];

const whole = await client.messages.create({ model, max_tokens: 200, messages });
const stream = client.messages.stream({ model, max_tokens: 200, messages });
let streamed = "";
stream.on("text", (text) => {
  streamed += text;
});
const final = await stream.finalMessage();

let notFound = null;
try {
  await client.messages.create({ model: "no-such-model", max_tokens: 10, messages });
} catch (error) {
  notFound = { name: error.constructor.name, status: error.status, type: error.error?.error?.type };
}

const models = [];
for await (const info of client.models.list()) models.push(info.id);

console.log(
  JSON.stringify({
    whole: { id: whole.id, stop_reason: whole.stop_reason, content: whole.content, usage: whole.usage },
    streamed,
    final: { stop_reason: final.stop_reason, content: final.content, usage: final.usage },
    notFound,
    models,
  }),
);
