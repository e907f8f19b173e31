// rlhf label: the four pages (rank, chat & compare, demonstrate, stats). A plain ES2020
// module, no build step, no dependencies; the shared parts are in ranker.js. Untrusted text
// reaches the page only through `el` (Text nodes), never innerHTML.
import { ROLE_NAMES, Ranker, api, el, loadConfig, renderMessage, showError } from "./ranker.js";
// ---------------------------------------------------------------- rank page

async function initRankPage() {
  const root = document.getElementById("rank-root");
  const empty = document.getElementById("queue-empty");
  const left = document.getElementById("queue-left");
  const status = document.getElementById("rank-status");
  const error = document.getElementById("rank-error");
  let rules = [];
  let ranked = 0;

  async function updateCounter() {
    try {
      const stats = await api("GET", "/api/stats");
      left.textContent = `${stats.totals.pending} left in queue`;
    } catch (_) {
      left.textContent = "";
    }
  }

  async function next() {
    showError(error, null);
    let items;
    try {
      items = await api("GET", "/api/queue?limit=1");
    } catch (err) {
      showError(error, err);
      return;
    }
    updateCounter();
    if (!items.length) {
      root.replaceChildren(); // a submitted or skipped Ranker has let go of the keys already
      empty.hidden = false;
      return;
    }
    empty.hidden = true;
    const ranker = new Ranker(root, items[0], rules, () => {
      ranked += 1;
      status.textContent = `Saved ranking of comparison ${items[0].id} (${ranked} this session).`;
      next();
    }, next);
    ranker.form.focus();
  }

  document.getElementById("queue-reload").addEventListener("click", next);
  try {
    rules = (await loadConfig()).rules;
  } catch (err) {
    showError(error, err);
    return;
  }
  next();
}

// ---------------------------------------------------------------- chat page

async function initChatPage() {
  const log = document.getElementById("chat-log");
  if (!log) return; // started without a policy: the page says so
  const form = document.getElementById("chat-form");
  const input = document.getElementById("chat-input");
  const send = document.getElementById("chat-send");
  const error = document.getElementById("chat-error");
  const panel = document.getElementById("compare-panel");
  const compareRoot = document.getElementById("compare-root");
  const compareStatus = document.getElementById("compare-status");
  const cfg = await loadConfig().catch((err) => { showError(error, err); return null; });
  if (!cfg) return;
  let messages = [];
  let busy = false;
  let ranker = null;

  function render() {
    log.replaceChildren(...messages.map((msg, i) => {
      const li = renderMessage(msg);
      if (msg.role === "assistant") {
        li.append(el("div", { class: "msg-actions" },
          el("button", { type: "button", class: "compare", onclick: () => compare(i),
            title: `sample ${cfg.k} alternatives for this point and rank them` }, "Compare"),
          msg.compared ? el("span", { class: "status", text: msg.compared }) : null));
      }
      return li;
    }));
  }

  function setBusy(value) {
    busy = value;
    send.disabled = value;
    log.querySelectorAll("button.compare").forEach((b) => { b.disabled = value; });
  }

  const plain = (upto) => messages.slice(0, upto).map(({ role, content }) => ({ role, content }));

  async function sendMessage() {
    const text = input.value;
    if (busy || !text.trim()) return;
    showError(error, null);
    messages.push({ role: "user", content: text });
    input.value = "";
    render();
    setBusy(true);
    log.append(el("li", { class: "msg msg-assistant pending" }, el("span", { class: "role", text: "Assistant" }),
      el("div", { class: "text", text: "…" })));
    try {
      const out = await api("POST", "/api/chat", { messages: plain(messages.length) });
      messages.push({ role: "assistant", content: out.reply });
    } catch (err) {
      messages.pop();
      input.value = text;
      showError(error, err);
    }
    setBusy(false);
    render();
    input.focus();
  }

  // The ChatGPT flow: alternatives for the point where the model spoke, i.e. for the
  // conversation before assistant message i; they are ranked as a new comparison.
  async function compare(i) {
    if (busy) return;
    showError(error, null);
    setBusy(true);
    panel.hidden = false;
    compareStatus.textContent = `Sampling ${cfg.k} alternatives…`;
    compareRoot.replaceChildren();
    try {
      const { comparison_id: id } = await api("POST", "/api/alternatives", { messages: plain(i), k: cfg.k });
      const item = await api("GET", `/api/comparisons/${encodeURIComponent(id)}`);
      compareStatus.textContent = `Comparison ${id}: rank the alternatives for message ${i + 1}.`;
      if (ranker) ranker.detach();
      ranker = new Ranker(compareRoot, item, cfg.rules, () => {
        messages[i].compared = `ranked as comparison ${id}`;
        compareStatus.textContent = `Saved ranking of comparison ${id}.`;
        compareRoot.replaceChildren();
        ranker = null;
        render();
      });
      ranker.form.focus();
      panel.scrollIntoView({ block: "start" });
    } catch (err) {
      compareStatus.textContent = "";
      panel.hidden = true;
      showError(error, err);
    }
    setBusy(false);
  }

  form.addEventListener("submit", (ev) => { ev.preventDefault(); sendMessage(); });
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); sendMessage(); }
  });
  document.getElementById("chat-reset").addEventListener("click", () => {
    if (busy) return;
    messages = [];
    if (ranker) ranker.detach();
    ranker = null;
    panel.hidden = true;
    render();
  });
  document.getElementById("compare-close").addEventListener("click", () => {
    if (ranker) ranker.detach();
    ranker = null;
    panel.hidden = true;
  });
  render();
}

// ---------------------------------------------------------------- demonstration page

// Provenance of a suggestion, decided when saving: kept verbatim = accepted, changed =
// edited, cleared, replaced by a newer suggestion or thrown away with Discard = discarded.
function suggestionAction(suggestion, finalText) {
  if (suggestion.discarded || !finalText.trim()) return "discarded";
  return finalText === suggestion.text ? "accepted" : "edited";
}

async function initDemoPage() {
  const list = document.getElementById("demo-turns");
  const saved = document.getElementById("demo-saved");
  const error = document.getElementById("demo-error");
  const save = document.getElementById("demo-save");
  const hasPolicy = document.body.dataset.policy === "true";
  let turns = []; // {role, area, suggestions: [{text, discarded}]}

  function addTurn(role, text = "") {
    const turn = { role, suggestions: [] };
    turn.area = el("textarea", { rows: "4", name: `turn-${role}`, "aria-label": `${ROLE_NAMES[role]} turn` });
    turn.area.value = text;
    turns.push(turn);
    render();
    turn.area.focus();
  }

  async function suggest(turn) {
    const at = turns.indexOf(turn);
    const before = turns.slice(0, at).map((t) => ({ role: t.role, content: t.area.value }));
    showError(error, null);
    turn.status.textContent = "Asking the model…";
    turn.suggestButton.disabled = true;
    try {
      const out = await api("POST", "/api/chat", { messages: before });
      const last = turn.suggestions[turn.suggestions.length - 1];
      if (last) last.discarded = true; // replaced by the new one
      // As the labeler saw it: a textarea turns \r\n and \r into \n, so "accepted" means
      // the stored turn equals the stored suggestion exactly.
      const text = out.reply.replace(/\r\n?/g, "\n");
      turn.suggestions.push({ text, discarded: false });
      turn.area.value = text;
      turn.status.textContent = "Suggestion: keep it, edit it or discard it.";
    } catch (err) {
      turn.status.textContent = "";
      showError(error, err);
    }
    turn.suggestButton.disabled = false;
    turn.area.focus();
  }

  function discard(turn) {
    const last = turn.suggestions[turn.suggestions.length - 1];
    if (last && !last.discarded) {
      last.discarded = true;
      turn.area.value = "";
      turn.status.textContent = "Suggestion discarded.";
    }
    turn.area.focus();
  }

  function render() {
    list.replaceChildren(...turns.map((turn, i) => {
      turn.status = turn.status || el("span", { class: "status", role: "status" });
      const tools = el("div", { class: "turn-tools" });
      if (turn.role === "assistant" && hasPolicy) {
        turn.suggestButton = el("button", { type: "button", class: "suggest", onclick: () => suggest(turn) }, "Suggest");
        tools.append(turn.suggestButton,
          el("button", { type: "button", class: "discard", onclick: () => discard(turn) }, "Discard"));
      }
      tools.append(el("button", { type: "button", class: "remove", onclick: () => removeTurn(turn) }, "Remove"),
        turn.status);
      return el("li", { class: `turn turn-${turn.role}`, "data-turn": i },
        el("span", { class: "role", text: ROLE_NAMES[turn.role] }), turn.area, tools);
    }));
  }

  function removeTurn(turn) {
    turns = turns.filter((t) => t !== turn);
    render();
  }

  async function saveDemo() {
    showError(error, null);
    saved.textContent = "";
    const messages = turns.map((t) => ({ role: t.role, content: t.area.value }));
    const blank = messages.findIndex((m) => !m.content.trim());
    if (!messages.length || blank >= 0) {
      showError(error, new Error(messages.length ? `turn ${blank + 1} is empty` : "add a turn first"));
      return;
    }
    if (messages[messages.length - 1].role !== "assistant") {
      showError(error, new Error("a demonstration ends with an assistant turn"));
      return;
    }
    const suggestions = [];
    turns.forEach((t, i) => t.suggestions.forEach((s) =>
      suggestions.push({ turn: i, text: s.text, action: suggestionAction(s, t.area.value) })));
    save.disabled = true;
    try {
      const out = await api("POST", "/api/demonstrations", { messages, suggestions });
      saved.textContent = `Saved demonstration ${out.id}.`;
      saved.dataset.demoId = out.id;
    } catch (err) {
      showError(error, err);
    }
    save.disabled = false;
  }

  function reset() {
    turns = [];
    saved.textContent = "";
    showError(error, null);
    addTurn("user");
  }

  document.getElementById("demo-add-user").addEventListener("click", () => addTurn("user"));
  document.getElementById("demo-add-assistant").addEventListener("click", () => addTurn("assistant"));
  save.addEventListener("click", saveDemo);
  document.getElementById("demo-new").addEventListener("click", reset);
  reset();
}

// ---------------------------------------------------------------- stats page

function fmt(value, digits) {
  if (value === null || value === undefined) return "—";
  return typeof value === "number" && digits !== undefined ? value.toFixed(digits) : String(value);
}

async function initStatsPage() {
  const totals = document.getElementById("stats-totals");
  const body = document.querySelector("#stats-table tbody");
  const error = document.getElementById("stats-error");
  const names = { comparisons: "Comparisons", ranked: "Ranked", pending: "Pending", rankings: "Rankings",
    demonstrations: "Demonstrations", labelers: "Labelers" };

  async function load() {
    showError(error, null);
    let stats;
    try {
      stats = await api("GET", "/api/stats");
    } catch (err) {
      showError(error, err);
      return;
    }
    totals.replaceChildren(...Object.entries(stats.totals).map(([key, value]) => el("div", { class: "total" },
      el("dt", { text: names[key] || key }), el("dd", { "data-total": key, text: fmt(value) }))));
    const rows = stats.labelers.map((l) => el("tr", { "data-labeler": l.name },
      el("th", { scope: "row", text: l.name }),
      el("td", { class: "num", text: fmt(l.count) }),
      el("td", { class: "num", text: fmt(l.median_seconds, 1) }),
      el("td", { class: "num", text: l.agreement === null ? "—" : `${(100 * l.agreement).toFixed(0)} %` }),
      el("td", { class: "num", text: fmt(l.kendall_tau, 2) }),
      el("td", { class: "num", text: fmt(l.overlap_items) })));
    body.replaceChildren(...(rows.length ? rows
      : [el("tr", {}, el("td", { colspan: "6", class: "empty", text: "No rankings yet." }))]));
  }

  document.getElementById("stats-reload").addEventListener("click", load);
  load();
}

// ---------------------------------------------------------------- start

const PAGES = { rank: initRankPage, chat: initChatPage, demo: initDemoPage, stats: initStatsPage };

document.addEventListener("DOMContentLoaded", () => {
  const init = PAGES[document.body.dataset.page];
  if (init) init();
});
