// rlhf label: what every page shares (the API client, safe DOM building, the ranking
// component). A plain ES2020 module, no build step, no dependencies.
//
// Safety: prompts, model replies and anything a labeler typed are untrusted text. They reach
// the page only through textContent / Text nodes (the `el` helper); nothing here assigns
// innerHTML. The server's CSP forbids inline script and style, so a page's data comes from
// <body data-*>, <meta name="csrf-token"> and GET /api/config.
//
// One `Ranker` component ranks one comparison; the rank page and the chat page's Compare
// both use it. Ranks are 1-based in the UI (1 = best, equal = tie) and sent 0-based,
// indexed by each reply's `idx` (its sampling position), not by its display position.
//
// A reply that searched comes with `evidence` (the server parses it with
// orchestrator/evidence/format.py): the card shows its answer as the reply and, beside it, an
// evidence card (the query, the inserted passages with the quote highlighted, the source).
// Each card has its own "supported?" (evidence cards only), "plausible?" and rule-violation
// checkboxes; they are sent as {"<idx>": ...} maps, so the rule reward model knows which reply
// broke which rule.

// ---------------------------------------------------------------- helpers

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

// JSON over fetch, same origin, cookie auth; POSTs carry the CSRF header. Errors become an
// ApiError carrying the server's {"error": "..."} message.
export async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (method !== "GET") init.headers["X-CSRF-Token"] = csrfToken();
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, `cannot reach the server (${err.message})`);
  }
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    data = null;
  }
  if (!resp.ok) {
    let msg = data && typeof data.error === "string" ? data.error : `${resp.status} ${resp.statusText}`;
    if (resp.status === 401) msg += " (sign in again with your login URL)";
    throw new ApiError(resp.status, msg);
  }
  return data;
}

// el("div", {class: "x"}, "text", child): strings become Text nodes, never markup.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

export function showError(node, err) {
  if (!node) return;
  node.textContent = err ? (err.message || String(err)) : "";
  node.hidden = !err;
}

function cardLabel(pos) {
  return pos < 26 ? String.fromCharCode(65 + pos) : `#${pos + 1}`;
}

export const ROLE_NAMES = { user: "User", assistant: "Assistant", system: "System" };

export function renderMessage(msg) {
  return el("li", { class: `msg msg-${msg.role === "user" || msg.role === "assistant" ? msg.role : "other"}` },
    el("span", { class: "role", text: ROLE_NAMES[msg.role] || String(msg.role) }),
    el("div", { class: "text", text: String(msg.content) }));
}

// Keys go to the page's tools unless the labeler is typing in a text field.
function isTyping(target) {
  if (!(target instanceof HTMLElement)) return false;
  if (target.isContentEditable || target.tagName === "TEXTAREA" || target.tagName === "SELECT") return true;
  if (target.tagName !== "INPUT") return false;
  return !["checkbox", "radio", "button", "submit", "reset"].includes(target.type);
}

let config = null;
export async function loadConfig() {
  if (!config) config = await api("GET", "/api/config");
  return config;
}

// ---------------------------------------------------------------- the ranking component

// Letters choose a card; `u` is kept for "all unacceptable", so letters run a..t (K <= 20).
const CARD_KEYS = "abcdefghijklmnopqrst";
let activeRanker = null;

export class Ranker {
  // item: {id, prompt_messages, replies: [{idx, text}]} in display order;
  // onDone(item) runs after a successful submission; onSkip (optional) moves past an item
  // the server refuses with 409 (ranked already, or leased to someone else meanwhile).
  constructor(root, item, rules, onDone, onSkip = null) {
    this.root = root;
    this.item = item;
    this.rules = rules || [];
    this.onDone = onDone;
    this.onSkip = onSkip;
    this.k = item.replies.length;
    this.ranks = new Array(this.k).fill(null); // UI ranks 1..K by display position
    this.selected = 0;
    this.busy = false;
    this.render();
    activeRanker = this;
  }

  render() {
    const convo = el("ol", { class: "messages conversation", "aria-label": "Conversation" },
      ...this.item.prompt_messages.map(renderMessage));
    this.cards = this.item.replies.map((reply, pos) => this.renderCard(reply, pos));
    this.unacceptable = el("input", { type: "checkbox", name: "unacceptable", onchange: () => this.refresh() });
    const rules = this.rules.map((rule) => el("li", {},
      el("span", { class: "rule-name", text: rule.name }), " ",
      rule.text ? el("span", { class: "rule-text", text: rule.text }) : null));
    this.betterReply = el("textarea", { name: "better_reply", rows: "4", id: `better-${this.item.id}` });
    this.note = el("textarea", { name: "note", rows: "2", id: `note-${this.item.id}` });
    this.submitButton = el("button", { type: "button", class: "primary", name: "submit", onclick: () => this.submit() },
      "Submit ranking");
    this.error = el("p", { class: "error", role: "alert", hidden: true });
    this.progress = el("span", { class: "progress" });
    const extras = el("div", { class: "extras" },
      el("label", { class: "check unacceptable" }, this.unacceptable,
        el("span", { text: "All replies are unacceptable" }), el("kbd", { text: "u" })),
      rules.length ? el("div", { class: "rules" }, el("h3", { text: "Rules (tick the ones a reply breaks, on its card)" }),
        el("ul", {}, ...rules)) : null,
      el("label", { for: this.betterReply.id, text: "Better reply (optional; saved as a demonstration) " },
        el("kbd", { text: "/" })),
      this.betterReply,
      el("label", { for: this.note.id, text: "Note (optional)" }),
      this.note);
    const form = el("div", { class: "ranker", tabindex: "-1", "data-comparison-id": this.item.id },
      el("h2", { class: "sr-title", text: `Comparison ${this.item.id}` }),
      convo,
      el("div", { class: "cards" }, ...this.cards.map((c) => c.node)),
      extras,
      el("div", { class: "actions" }, this.submitButton, this.progress),
      this.error);
    this.root.replaceChildren(form);
    this.form = form;
    const keysMax = document.getElementById("keys-max"); // the key help names this item's K
    if (keysMax) keysMax.textContent = String(Math.min(this.k, 9));
    this.refresh();
  }

  renderCard(reply, pos) {
    const buttons = [];
    for (let r = 1; r <= this.k; r++) {
      buttons.push(el("button", {
        type: "button", class: "rank-btn", "data-rank": r, "aria-pressed": "false",
        "aria-label": `Reply ${cardLabel(pos)}: rank ${r}`,
        onclick: (ev) => {
          ev.stopPropagation(); // the card's own click would re-select this card after setRank moved on
          this.selected = pos;
          this.setRank(pos, r);
        },
      }, String(r)));
    }
    const node = el("article", {
      class: "card", "data-pos": pos, "data-idx": reply.idx, "aria-label": `Reply ${cardLabel(pos)}`,
      onclick: () => this.select(pos),
      onfocusin: () => { if (this.selected !== pos) this.select(pos); }, // Tab into a card chooses it
    },
    el("header", {},
      el("span", { class: "card-label", text: cardLabel(pos) }),
      el("span", { class: "card-rank", text: "" })),
    el("div", { class: "reply-body" },
      el("div", { class: "text reply-text", text: String(reply.evidence ? reply.evidence.answer : reply.text) }),
      reply.evidence ? evidenceCard(reply.evidence) : null),
    this.judgements(reply),
    el("div", { class: "rank-buttons", role: "group", "aria-label": "Rank (1 = best)" }, ...buttons));
    return { node, buttons, badge: node.querySelector(".card-rank") };
  }

  // Per reply: supported? (only when it shows evidence), plausible?, and one box per rule.
  judgements(reply) {
    const box = (name, label, extra = {}) => el("label", { class: "check" },
      el("input", { type: "checkbox", name, "data-idx": reply.idx, ...extra }), el("span", { text: label }));
    return el("div", { class: "judgements" },
      reply.evidence ? box("supported", "supported?") : null,
      box("plausible", "plausible?"),
      this.rules.length ? el("fieldset", { class: "rules" }, el("legend", { text: "Rule violations" }),
        ...this.rules.map((rule) => el("label", { class: "check", title: rule.text || rule.name },
          el("input", { type: "checkbox", name: "violation", value: rule.name, "data-idx": reply.idx }),
          el("span", { class: "rule-name", text: rule.name })))) : null);
  }

  checked(name, idx) {
    const box = this.form.querySelector(`input[name="${name}"][data-idx="${idx}"]`);
    return box ? box.checked : null;
  }

  select(pos) {
    this.selected = Math.max(0, Math.min(this.k - 1, pos));
    this.refresh();
  }

  setRank(pos, rank) {
    this.ranks[pos] = rank;
    // Move on to the next card without a rank, so "1 2 3 ..." ranks a whole item.
    if (rank !== null) {
      for (let step = 1; step <= this.k; step++) {
        const next = (pos + step) % this.k;
        if (this.ranks[next] === null) { this.selected = next; break; }
      }
    }
    this.refresh();
  }

  complete() {
    return this.ranks.every((r) => r !== null) || this.unacceptable.checked;
  }

  refresh() {
    this.cards.forEach((card, pos) => {
      const rank = this.ranks[pos];
      const tie = rank !== null && this.ranks.filter((r) => r === rank).length > 1;
      card.node.classList.toggle("selected", pos === this.selected);
      card.node.classList.toggle("ranked", rank !== null);
      card.node.setAttribute("aria-current", pos === this.selected ? "true" : "false");
      card.badge.textContent = rank === null ? "not ranked" : `rank ${rank}${tie ? " (tie)" : ""}`;
      card.buttons.forEach((b, i) => b.setAttribute("aria-pressed", String(rank === i + 1)));
    });
    const done = this.ranks.filter((r) => r !== null).length;
    this.submitButton.disabled = this.busy || !this.complete();
    this.submitButton.textContent = this.unacceptable.checked && done < this.k
      ? "Submit as all unacceptable" : "Submit ranking";
    this.progress.textContent = this.complete() ? "Enter submits" : `${done} of ${this.k} ranked`;
  }

  // UI rank r (1-based, by display position) -> API rank r-1 at the reply's idx. With "all
  // unacceptable" and cards left unranked, those tie for last.
  apiRanks() {
    const ranks = new Array(this.k).fill(this.k - 1);
    this.item.replies.forEach((reply, pos) => {
      if (this.ranks[pos] !== null) ranks[reply.idx] = this.ranks[pos] - 1;
    });
    return ranks;
  }

  async submit() {
    if (this.busy || !this.complete()) return;
    this.busy = true;
    this.refresh();
    showError(this.error, null);
    const body = {
      ranks: this.apiRanks(),
      unacceptable: this.unacceptable.checked,
      // Per reply idx; sent only when there are rule boxes ({} then means "no rule broken").
      violations: this.rules.length ? {} : undefined,
      evidence: {},
    };
    for (const reply of this.item.replies) {
      const ticked = [...this.form.querySelectorAll(`input[name="violation"][data-idx="${reply.idx}"]:checked`)];
      if (ticked.length && body.violations) body.violations[reply.idx] = ticked.map((c) => c.value);
      body.evidence[reply.idx] = { supported: this.checked("supported", reply.idx), plausible: this.checked("plausible", reply.idx) };
    }
    if (this.betterReply.value.trim()) body.better_reply = this.betterReply.value;
    if (this.note.value.trim()) body.note = this.note.value;
    try {
      await api("POST", `/api/comparisons/${encodeURIComponent(this.item.id)}/ranking`, body);
    } catch (err) {
      this.busy = false;
      this.refresh();
      showError(this.error, err);
      if (err.status === 409 && this.onSkip) {
        this.error.append(" ", el("button", { type: "button", onclick: () => { this.detach(); this.onSkip(); } },
          "Next item"));
      }
      return;
    }
    if (activeRanker === this) activeRanker = null;
    this.onDone(this.item);
  }

  handleKey(ev) {
    const key = ev.key;
    if (key === "Enter") {
      if (!this.complete()) return false;
      this.submit();
      return true;
    }
    if (key === "u" || key === "U") {
      this.unacceptable.checked = !this.unacceptable.checked;
      this.refresh();
      return true;
    }
    if (key === "/") {
      this.betterReply.focus();
      return true;
    }
    if (key === "ArrowLeft" || key === "ArrowRight") {
      this.select(this.selected + (key === "ArrowLeft" ? -1 : 1));
      return true;
    }
    if (key === "0" || key === "Backspace" || key === "Delete") {
      this.setRank(this.selected, null);
      return true;
    }
    if (/^[1-9]$/.test(key) && Number(key) <= this.k) {
      this.setRank(this.selected, Number(key));
      return true;
    }
    const letter = CARD_KEYS.indexOf(key.toLowerCase());
    if (key.length === 1 && letter >= 0 && letter < this.k) {
      this.select(letter);
      return true;
    }
    return false;
  }

  detach() {
    if (activeRanker === this) activeRanker = null;
    this.root.replaceChildren();
  }
}

// The evidence card: the query, each inserted passage (the quote highlighted where it is
// verbatim in a passage of the cited title) and the citation. Text nodes and <mark> only.
export function evidenceCard(ev) {
  const passages = ev.passages.map((p) => {
    const body = el("span", { class: "passage-text" });
    const at = ev.quote_found && p.title === ev.cited_title ? p.text.indexOf(ev.quote) : -1;
    if (at >= 0) {
      body.append(p.text.slice(0, at), el("mark", { text: ev.quote }), p.text.slice(at + ev.quote.length));
    } else {
      body.append(p.text);
    }
    return el("li", { class: "passage" }, el("span", { class: "passage-title", text: p.title }), body);
  });
  let source = el("p", { class: "source none", text: "No source cited." });
  if (ev.cited_title !== null) {
    source = el("p", { class: ev.quote_found ? "source" : "source unfound" },
      el("span", { text: "Source: " }), el("span", { class: "source-title", text: ev.cited_title }),
      el("q", { text: ev.quote || "" }),
      ev.quote_found ? null : el("span", { class: "warn", text: " (not found in the passages shown)" }));
  }
  return el("aside", { class: "evidence", "aria-label": "Evidence" },
    ...ev.queries.map((q) => el("p", { class: "query" }, el("span", { class: "label", text: "Searched: " }),
      el("span", { class: "query-text", text: q }))),
    el("ol", { class: "passages" }, ...passages),
    source);
}

document.addEventListener("keydown", (ev) => {
  if (!activeRanker || ev.ctrlKey || ev.metaKey || ev.altKey || ev.isComposing) return;
  if (!activeRanker.root.isConnected || activeRanker.root.closest("[hidden]")) return;
  if (isTyping(ev.target)) {
    // Esc leaves a text box so that the keys work again.
    if (ev.key === "Escape" && activeRanker.form.contains(ev.target)) {
      ev.target.blur();
      activeRanker.form.focus();
      ev.preventDefault();
    }
    return;
  }
  if (activeRanker.handleKey(ev)) ev.preventDefault();
});
