// The topic-chat page: every call goes to the same /chat/* endpoints a client would use.
"use strict";

const $ = (id) => document.getElementById(id);
// The key lives in this tab's session only, never in lasting storage.
const state = { key: sessionStorage.getItem("chatgate-key") || "", series: [], topic: null, busy: false };

function say(text) { $("status").textContent = text || ""; }

async function call(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { "Authorization": `Bearer ${state.key}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) {
    let message = `${response.status}`;
    try { message = (await response.json()).message || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

async function json(method, path, body) { return (await call(method, path, body)).json(); }

function seriesId() { return Number($("series").value); }
function modelId() { return Number($("model").value); }

function fillModels() {
  const series = state.series.find((s) => s.id === seriesId());
  $("model").replaceChildren(...(series ? series.models : []).map((m) => new Option(m.name, m.id)));
}

async function start() {
  say("");
  try {
    state.series = await json("GET", "/chat/series");
  } catch (error) { say(`Could not load the models: ${error.message}`); return; }
  $("series").replaceChildren(...state.series.map((s) => new Option(s.name, s.id)));
  fillModels();
  try {
    await loadTopics();
  } catch (error) { say(`The key was refused: ${error.message}`); return; }
  sessionStorage.setItem("chatgate-key", state.key);
  $("app").hidden = false;
}

async function loadTopics() {
  const topics = await json("GET", `/chat/topic?seriesId=${seriesId()}`);
  topics.sort((a, b) => (b.favorite - a.favorite) || b.updatedAt.localeCompare(a.updatedAt));
  $("topics").replaceChildren(...topics.map(topicItem));
}

function topicItem(topic) {
  const li = document.createElement("li");
  li.dataset.id = topic.id;
  li.classList.toggle("active", state.topic && state.topic.id === topic.id);
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = topic.name;
  name.title = topic.name;
  name.onclick = () => openTopic(topic);
  const star = button(topic.favorite ? "★" : "☆", "favorite", async () => {
    await run(async () => { await json("PATCH", `/chat/topic/${topic.id}`, { favorite: !topic.favorite }); await loadTopics(); });
  });
  const rename = button("✎", "rename", async () => {
    const value = prompt("Rename the topic", topic.name);
    if (!value) return;
    await run(async () => {
      const updated = await json("PATCH", `/chat/topic/${topic.id}`, { name: value });
      if (state.topic && state.topic.id === topic.id) { state.topic = updated; $("topic-title").textContent = updated.name; }
      await loadTopics();
    });
  });
  const remove = button("✕", "delete", async () => {
    if (!confirm(`Delete "${topic.name}" and its messages?`)) return;
    await run(async () => {
      await json("DELETE", `/chat/topic/${topic.id}`);
      if (state.topic && state.topic.id === topic.id) closeTopic();
      await loadTopics();
    });
  });
  li.append(name, star, rename, remove);
  return li;
}

function button(label, action, onclick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = `quiet ${action}`;
  b.textContent = label;
  b.title = action;
  b.onclick = onclick;
  return b;
}

async function run(work) {
  say("");
  try { await work(); } catch (error) { say(error.message); }
}

function closeTopic() {
  state.topic = null;
  $("topic-title").textContent = "Pick or create a topic";
  $("messages").replaceChildren();
  $("send-form").hidden = true;
}

async function openTopic(topic) {
  state.topic = topic;
  $("topic-title").textContent = topic.name;
  $("send-form").hidden = false;
  for (const li of $("topics").children) li.classList.toggle("active", Number(li.dataset.id) === topic.id);
  await run(loadMessages);
}

async function loadMessages() {
  const messages = await json("GET", `/chat/topic/${state.topic.id}/message`);
  $("messages").replaceChildren(...messages.map(messageItem));
  $("messages").scrollTop = $("messages").scrollHeight;
}

function messageItem(message) {
  const li = document.createElement("li");
  li.className = `msg ${message.type === 0 ? "user" : "ai"}`;
  li.dataset.id = message.id;
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = message.message;
  li.append(text);
  if (message.status) {
    const badge = document.createElement("div");
    badge.className = "state";
    badge.textContent = message.status;
    li.append(badge);
  }
  const tools = document.createElement("div");
  tools.className = "tools";
  tools.append(
    button("edit", "edit", async () => {
      const value = prompt("Edit the message", message.message);
      if (!value) return;
      await run(async () => { await json("PATCH", `/chat/topic/${state.topic.id}/message/${message.id}`, { message: value }); await loadMessages(); });
    }),
    button("regenerate", "regenerate", () => regenerate(message.id)),
  );
  li.append(tools);
  return li;
}

function options() {
  return { seriesId: seriesId(), modelId: modelId(), enableMemory: $("memory").checked, enableGoogleResults: $("web").checked };
}

// Reads a streamed reply into `target`; returns the metadata after the ¦.
async function stream(response, target) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    text += decoder.decode(value, { stream: true });
    const cut = text.lastIndexOf("¦");
    target.textContent = cut >= 0 ? text.slice(0, cut) : text;
  }
  const cut = text.lastIndexOf("¦");
  return cut >= 0 ? JSON.parse(text.slice(cut + 1)) : {};
}

async function converse(path, body, target) {
  if (state.busy) return;
  state.busy = true;
  $("send").disabled = true;
  try {
    const meta = await stream(await call("POST", path, body), target);
    if (meta.error) say(`The reply failed: ${meta.error}`);
    else if (meta.webSearch === "unavailable") say("Web results are not available on this server.");
    await loadMessages();
    await loadTopics();
  } catch (error) {
    say(error.message);
    await loadMessages().catch(() => {});
  } finally {
    state.busy = false;
    $("send").disabled = false;
  }
}

async function send(text) {
  const user = messageItem({ id: 0, type: 0, message: text });
  const reply = messageItem({ id: 0, type: 1, message: "" });
  reply.classList.add("streaming");
  $("messages").append(user, reply);
  await converse(`/chat/topic/${state.topic.id}/message`, { ...options(), message: text }, reply.querySelector(".text"));
}

async function regenerate(messageId) {
  if (state.busy) return;
  const item = [...$("messages").children].find((li) => Number(li.dataset.id) === messageId);
  let target = item;
  if (item && item.classList.contains("user")) target = item.nextElementSibling;
  if (target && target.classList.contains("ai")) {
    target.classList.add("streaming");
    target.querySelector(".text").textContent = "";
  }
  const sink = target ? target.querySelector(".text") : document.createElement("div");
  await converse(`/chat/topic/${state.topic.id}/message/${messageId}/regenerate`, options(), sink);
}

$("key-form").onsubmit = (event) => { event.preventDefault(); state.key = $("key").value.trim(); start(); };
$("series").onchange = () => { fillModels(); closeTopic(); run(loadTopics); };
$("topic-form").onsubmit = (event) => {
  event.preventDefault();
  run(async () => {
    const topic = await json("POST", "/chat/topic", { name: $("topic-name").value, seriesId: seriesId() });
    $("topic-name").value = "";
    await loadTopics();
    await openTopic(topic);
  });
};
$("send-form").onsubmit = (event) => {
  event.preventDefault();
  if (state.busy) return;  // Ctrl+Enter while a reply streams: keep the draft
  const text = $("input").value;
  if (!text.trim()) return;
  $("input").value = "";
  send(text);
};
$("input").onkeydown = (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("send-form").requestSubmit();
};
if (state.key) { $("key").value = state.key; start(); }
