// The nima-edge chat page: plain JavaScript, no build step, nothing loaded from elsewhere.
// The conversation lives here (and in localStorage); each turn sends it whole to /v1/chat/completions
// with fit_context, so the server renders the model's chat template and drops the oldest turns that no
// longer fit the context, and says how many it dropped.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "nima-edge-chat";
const SETTINGS = ["system", "temperature", "top_k", "top_p", "max_tokens", "seed", "api_key"];

let history = [];        // [{role, content}] without the system prompt
let models = {};         // id -> model card from /v1/models
let controller = null;   // AbortController of the reply being streamed

function save() {
  const settings = Object.fromEntries(SETTINGS.map((k) => [k, $(k).value]));
  localStorage.setItem(STORE, JSON.stringify({ history, settings, model: $("model").value }));
}

function restore() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "{}");
    history = Array.isArray(saved.history) ? saved.history : [];
    for (const [k, v] of Object.entries(saved.settings || {})) if (SETTINGS.includes(k)) $(k).value = v;
    return saved.model;
  } catch { return undefined; }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

async function errorText(response) {
  try { return (await response.json()).error.message; } catch { return `${response.status} ${response.statusText}`; }
}

async function loadModels(preferred) {
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) {
    notice("This server needs an API key: enter it under Settings.");
    showSettings(true);
    return;
  }
  if (!response.ok) { notice(await errorText(response)); return; }
  const select = $("model");
  select.replaceChildren();
  models = {};
  for (const card of (await response.json()).data) {
    models[card.id] = card;
    select.append(new Option(card.id, card.id));
  }
  if (preferred in models) select.value = preferred;
  notice("");
  showModelInfo();
}

function showModelInfo() {
  const card = models[$("model").value];
  $("model-info").textContent = card ? `${card.target} · context ${card.context_length} tokens` : "";
}

function showSettings(open) {
  $("settings").hidden = !open;
  $("toggle-settings").setAttribute("aria-expanded", String(open));
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  div.append(body);
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function render() {
  $("messages").replaceChildren();
  if (!history.length) {
    const p = document.createElement("p");
    p.className = "empty";
    p.textContent = "Say something to the model.";
    $("messages").append(p);
  }
  for (const m of history) bubble(m.role, m.content).classList.add("done");
}

function addNote(div, text) {
  const note = document.createElement("div");
  note.className = "note";
  note.textContent = text;
  div.prepend(note);
}

function showStats(div, t, finish) {
  const card = models[$("model").value] || {};
  const budget = card.budget || { tokens: 50, ms: 100 };
  const stats = document.createElement("div");
  stats.className = "stats";
  const parts = [`${t.predicted_n} tokens`, `prompt ${t.prompt_n} tokens in ${t.prompt_ms.toFixed(1)} ms`];
  if (t.predicted_per_second) {
    const perToken = 1000 / t.predicted_per_second;
    const perBudget = perToken * budget.tokens + t.prompt_ms;  // what the bench times: prefill + N tokens
    parts.push(`${t.predicted_per_second.toFixed(0)} tokens/s`);
    stats.textContent = parts.join(" · ") + " · ";
    const verdict = document.createElement("span");
    verdict.className = perBudget < budget.ms ? "ok" : "over";
    verdict.textContent = `${budget.tokens} tokens ≈ ${perBudget.toFixed(0)} ms (budget ${budget.ms} ms)`;
    stats.append(verdict);
  } else {
    stats.textContent = parts.join(" · ");
  }
  if (finish === "length") stats.append(" · stopped at max tokens");
  div.append(stats);
}

function requestBody() {
  const number = (id) => Number($(id).value);
  const body = {
    model: $("model").value, stream: true, fit_context: true,
    temperature: number("temperature"), top_k: Math.trunc(number("top_k")), top_p: number("top_p"),
    max_tokens: Math.trunc(number("max_tokens")),
    messages: [...($("system").value.trim() ? [{ role: "system", content: $("system").value }] : []), ...history],
  };
  if ($("seed").value !== "") body.seed = Math.trunc(number("seed"));
  return body;
}

// Server-sent events from a fetch body: "data: {json}" blocks separated by blank lines.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("model").disabled = on;
}

async function send(text) {
  if (history.length && history[history.length - 1].role === "user") history.pop();  // a failed turn
  history.push({ role: "user", content: text });
  document.querySelectorAll("#messages .empty").forEach((e) => e.remove());
  const mine = bubble("user", text);
  mine.classList.add("done");
  const div = bubble("assistant", "");
  const out = div.querySelector(".text");
  let reply = "", finish = null, failed = false;
  controller = new AbortController();
  busy(true);
  notice("");
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const ctx = chunk.nima_context;
      if (ctx && (ctx.dropped_messages || ctx.truncated)) {
        const what = ctx.dropped_messages
          ? `${ctx.dropped_messages} oldest message(s) left out to fit the ${ctx.context_length}-token context`
          : `your message was cut to its last part to fit the ${ctx.context_length}-token context`;
        addNote(div, what);
      }
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        reply += choice.delta.content;
        out.textContent = reply;
        div.scrollIntoView({ block: "end" });
      }
      if (choice && choice.finish_reason) finish = choice.finish_reason;
      if (chunk.timings) showStats(div, chunk.timings, finish);
    }
  } catch (e) {
    if (e.name === "AbortError") {
      const stopped = document.createElement("div");
      stopped.className = "stats";
      stopped.textContent = "stopped";
      div.append(stopped);
    } else {
      failed = true;
      notice(e.message);
      div.remove();
      mine.remove();
    }
  } finally {
    controller = null;
    busy(false);
  }
  if (failed) {
    $("input").value = text;  // nothing lost: the message comes back to the box
    history.pop();
  } else {
    history.push({ role: "assistant", content: reply });  // a stopped reply is kept as far as it got
    div.classList.add("done");
  }
  save();
}

function init() {
  const preferred = restore();
  render();
  loadModels(preferred);
  $("model").addEventListener("change", () => { showModelInfo(); save(); });
  $("toggle-settings").addEventListener("click", () => showSettings($("settings").hidden));
  $("settings").addEventListener("submit", (e) => e.preventDefault());  // Enter in a field sends nothing
  for (const id of SETTINGS) $(id).addEventListener("change", save);
  $("api_key").addEventListener("change", () => loadModels($("model").value));
  $("new-chat").addEventListener("click", () => {
    if (controller) controller.abort();
    history = [];
    save();
    render();
    notice("");
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value;
    if (!text.trim() || controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
}

init();
