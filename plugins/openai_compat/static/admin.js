// The key-management page: a thin client of /admin/api, no libraries (the server may be offline).
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#2f6fed", "#e8590c", "#0ca678", "#ae3ec9", "#f59f00", "#1098ad", "#d6336c", "#5c940d"];
let token = sessionStorage.getItem("chatgate-admin-token") || "";

async function api(method, path, body) {
  const response = await fetch("/admin/api" + path, {
    method,
    headers: { Authorization: "Bearer " + token, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error((data.error && data.error.message) || "HTTP " + response.status);
    error.status = response.status;
    throw error;
  }
  return data;
}

function say(text, kind) {
  const status = $("status");
  status.textContent = text;
  status.className = kind || "";
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function button(label, className, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.className = className;
  b.addEventListener("click", onClick);
  return b;
}

async function refresh() {
  const [users, keys, usage] = await Promise.all([
    api("GET", "/users"),
    api("GET", "/keys"),
    api("GET", "/usage?days=30"),
  ]);
  renderUsers(users.data);
  renderKeys(keys.data);
  renderChart(usage.data, keys.data);
}

function renderUsers(users) {
  const body = $("users");
  body.replaceChildren();
  for (const user of users) {
    const row = body.insertRow();
    row.dataset.email = user.email;
    cell(row, user.email);
    cell(row, user.balance, "num balance");
    const td = row.insertCell();
    const input = document.createElement("input");
    input.className = "small topup-amount";
    input.inputMode = "decimal";
    input.placeholder = "10";
    td.append(input, " ", button("Top up", "quiet topup", async () => {
      try {
        await api("POST", `/users/${user.id}/topup`, { amount: input.value.trim() || "0" });
        say(`Topped up ${user.email}.`, "ok");
        await refresh();
      } catch (error) {
        say(error.message, "error");
      }
    }));
  }
}

function renderKeys(keys) {
  const body = $("keys");
  body.replaceChildren();
  for (const key of keys) {
    const row = body.insertRow();
    row.dataset.prefix = key.prefix;
    if (!key.active) row.className = "revoked";
    cell(row, key.prefix + "…");
    cell(row, key.email || "");
    cell(row, key.name);
    cell(row, String(key.usage.requests), "num");
    cell(row, String(key.usage.tokens), "num");
    cell(row, key.usage.cost, "num");
    cell(row, key.active ? "active" : "revoked");
    const td = row.insertCell();
    if (key.active) {
      td.append(button("Revoke", "danger revoke", async () => {
        if (!confirm(`Revoke ${key.prefix}…? Its next request is refused.`)) return;
        try {
          await api("DELETE", `/keys/${key.id}`);
          say(`Revoked ${key.prefix}…`, "ok");
          await refresh();
        } catch (error) {
          say(error.message, "error");
        }
      }));
    }
  }
}

function renderChart(rows, keys) {
  // Stacked daily bars of tokens per key, with each day's cost written above.
  const chart = $("chart");
  chart.replaceChildren();
  if (!rows.length) {
    chart.textContent = "No usage yet.";
    return;
  }
  const names = new Map(keys.map((k) => [k.id, k.prefix + "… " + (k.name || k.email || "")]));
  const days = [...new Set(rows.map((r) => r.day))].sort();
  const keyIds = [...new Set(rows.map((r) => r.key_id))];
  const totals = days.map((day) => rows.filter((r) => r.day === day).reduce((sum, r) => sum + r.tokens, 0));
  const costs = days.map((day) => rows.filter((r) => r.day === day).reduce((sum, r) => sum + Number(r.cost), 0));
  const max = Math.max(...totals, 1);
  const width = 720, height = 240, pad = 28, barWidth = Math.max(4, (width - 2 * pad) / days.length - 6);
  const svgNs = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNs, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  days.forEach((day, i) => {
    const x = pad + i * ((width - 2 * pad) / days.length);
    let y = height - pad;
    keyIds.forEach((keyId, k) => {
      const row = rows.find((r) => r.day === day && r.key_id === keyId);
      if (!row) return;
      const h = (row.tokens / max) * (height - 2 * pad - 14);
      const rect = document.createElementNS(svgNs, "rect");
      rect.setAttribute("x", x);
      rect.setAttribute("y", y - h);
      rect.setAttribute("width", barWidth);
      rect.setAttribute("height", h);
      rect.setAttribute("fill", COLORS[k % COLORS.length]);
      const title = document.createElementNS(svgNs, "title");
      title.textContent = `${day} ${names.get(keyId) || "key " + keyId}: ${row.tokens} tokens, cost ${row.cost}`;
      rect.append(title);
      svg.append(rect);
      y -= h;
    });
    const cost = document.createElementNS(svgNs, "text");
    cost.setAttribute("x", x + barWidth / 2);
    cost.setAttribute("y", y - 4);
    cost.setAttribute("text-anchor", "middle");
    cost.setAttribute("font-size", "10");
    cost.textContent = costs[i].toFixed(2);
    svg.append(cost);
    const label = document.createElementNS(svgNs, "text");
    label.setAttribute("x", x + barWidth / 2);
    label.setAttribute("y", height - 8);
    label.setAttribute("text-anchor", "middle");
    label.setAttribute("font-size", "10");
    label.textContent = day.slice(5);
    svg.append(label);
  });
  const legend = document.createElement("div");
  legend.className = "legend";
  keyIds.forEach((keyId, k) => {
    const item = document.createElement("span");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = COLORS[k % COLORS.length];
    item.append(swatch, names.get(keyId) || "key " + keyId);
    legend.append(item);
  });
  chart.append(svg, legend);
}

async function signIn(candidate) {
  token = candidate;
  try {
    await refresh();
  } catch (error) {
    token = "";
    sessionStorage.removeItem("chatgate-admin-token");
    $("sign-in").hidden = false;
    $("console").hidden = true;
    alertSignIn(error.status === 401 ? "That token is not the server's admin token." : error.message);
    return;
  }
  sessionStorage.setItem("chatgate-admin-token", token);
  $("sign-in").hidden = true;
  $("console").hidden = false;
  $("sign-out").hidden = false;
}

function alertSignIn(text) {
  let note = document.querySelector("#sign-in .error");
  if (!note) {
    note = document.createElement("p");
    note.className = "error";
    note.style.color = "var(--bad)";
    $("sign-in").append(note);
  }
  note.textContent = text;
}

$("sign-in-form").addEventListener("submit", (event) => {
  event.preventDefault();
  signIn($("token").value.trim());
});

$("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem("chatgate-admin-token");
  location.reload();
});

$("user-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    const user = await api("POST", "/users", {
      email: $("user-email").value.trim(),
      balance: $("user-balance").value.trim() || "0",
    });
    say(`${user.email} has ${user.balance} credits.`, "ok");
    $("user-email").value = "";
    await refresh();
  } catch (error) {
    say(error.message, "error");
  }
});

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    const key = await api("POST", "/keys", { email: $("key-email").value.trim(), name: $("key-name").value.trim() });
    $("new-key-value").textContent = key.key;
    $("new-key").hidden = false;
    say(`Created ${key.prefix}… for ${key.email}.`, "ok");
    await refresh();
  } catch (error) {
    say(error.message, "error");
  }
});

$("copy-key").addEventListener("click", async () => {
  const text = $("new-key-value").textContent;
  try {
    await navigator.clipboard.writeText(text);
    say("Copied.", "ok");
  } catch {
    // Clipboard access needs a secure context; fall back to selecting the key.
    const range = document.createRange();
    range.selectNodeContents($("new-key-value"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    say("Selected: press Ctrl+C (⌘C) to copy.", "ok");
  }
});

if (token) signIn(token);
