// tuneloop console: live numbers, confirmations, the correction diff and the review keyboard shortcuts.
// No framework and nothing fetched from elsewhere; every page works without this script (plain forms and links).
"use strict";

function fmt(kind, v) {
  if (v === null || v === undefined) return "–";
  if (kind === "secs") return v < 1 ? Math.round(v * 1000) + " ms" : v.toFixed(2) + " s";
  if (kind === "pct") return (v * 100).toFixed(1) + "%";
  if (kind === "rate") return v.toPrecision(3);
  return String(v);
}

function startLive() {
  const box = document.querySelector("[data-live]");
  if (!box) return;
  const url = box.getAttribute("data-live");
  const tick = async () => {
    try {
      const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!r.ok) return;
      const data = await r.json();
      document.querySelectorAll("[data-live-key]").forEach((el) => {
        const value = el.getAttribute("data-live-key").split(".").reduce((o, k) => (o == null ? o : o[k]), data);
        if (value !== undefined) el.textContent = fmt(el.getAttribute("data-fmt"), value);
      });
      document.querySelectorAll("[data-live-list]").forEach((ul) => {
        const items = data[ul.getAttribute("data-live-list")];
        if (!Array.isArray(items)) return;
        ul.replaceChildren(...items.map((t) => { const li = document.createElement("li"); li.textContent = t; return li; }));
      });
      const span = document.querySelector("[data-live-span]");
      if (span) span.textContent = (data.since_start ? "Since the server started, " + data.span_s + " s ago" :
        "Over the last " + data.span_s + " s") + " (" + data.requests + " requests); refreshed every 5 s.";
    } catch (e) {
      /* the server is restarting: keep the last numbers */
    }
  };
  setInterval(tick, 5000);
}

function confirmForms() {
  document.querySelectorAll("form[data-confirm]").forEach((f) => {
    f.addEventListener("submit", (e) => {
      if (!window.confirm(f.getAttribute("data-confirm"))) e.preventDefault();
    });
  });
}

// word-level diff (longest common subsequence) of a -> b as [op, word] pairs, op in "=", "-", "+"
function wordDiff(a, b) {
  const x = a.split(/\s+/).filter(Boolean), y = b.split(/\s+/).filter(Boolean);
  const n = x.length, m = y.length;
  if (n * m > 4e6) return [["-", a], ["+", b]];
  const L = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--)
    L[i][j] = x[i] === y[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
  const out = [];
  let i = 0, j = 0;
  while (i < n && j < m) {
    if (x[i] === y[j]) { out.push(["=", x[i]]); i++; j++; }
    else if (L[i + 1][j] >= L[i][j + 1]) out.push(["-", x[i++]]);
    else out.push(["+", y[j++]]);
  }
  while (i < n) out.push(["-", x[i++]]);
  while (j < m) out.push(["+", y[j++]]);
  return out;
}

function showDiff(area) {
  const box = document.querySelector('[data-diff-for="' + area.id + '"]');
  if (!box) return;
  const served = area.getAttribute("data-served") || "";
  box.replaceChildren();
  if (area.value.trim() === served.trim()) {
    const s = document.createElement("span");
    s.className = "muted";
    s.textContent = "No change from the served answer.";
    box.appendChild(s);
    return;
  }
  for (const [op, w] of wordDiff(served, area.value)) {
    const el = document.createElement(op === "=" ? "span" : op === "-" ? "del" : "ins");
    el.textContent = w;
    box.appendChild(el);
    box.appendChild(document.createTextNode(" "));
  }
}

function reviewShortcuts() {
  document.querySelectorAll("textarea[data-served]").forEach((a) => {
    a.addEventListener("input", () => showDiff(a));
  });
  const items = Array.from(document.querySelectorAll("[data-item]"));
  const forms = Array.from(document.querySelectorAll("form[data-review]"));
  if (!forms.length) return;
  let current = 0;
  const focusItem = (k) => {
    if (!items.length) return;
    current = Math.max(0, Math.min(items.length - 1, k));
    items[current].focus();
    items[current].scrollIntoView({ block: "start" });
  };
  const activeForm = () => {
    const inItem = document.activeElement && document.activeElement.closest("[data-item]");
    if (inItem) current = items.indexOf(inItem);
    return items.length ? items[current].querySelector("form[data-review]") : forms[0];
  };
  document.addEventListener("keydown", (e) => {
    const t = e.target;
    const typing = t.tagName === "TEXTAREA" || t.tagName === "SELECT" || t.isContentEditable ||
      (t.tagName === "INPUT" && !["radio", "checkbox", "submit", "button"].includes(t.type));
    const form = activeForm();
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && form) { e.preventDefault(); form.requestSubmit(); return; }
    if (e.key === "Escape" && typing) { e.target.blur(); if (items.length) items[current].focus(); return; }
    if (typing || e.ctrlKey || e.metaKey || e.altKey || !form) return;
    const rate = { u: "up", d: "down", 1: "1", 2: "2", 3: "3", 4: "4", 5: "5" }[e.key];
    if (rate) {
      const r = form.querySelector('input[name="rating"][value="' + rate + '"]');
      if (r) { r.checked = true; r.focus(); e.preventDefault(); }
    } else if (e.key === "j") { focusItem(current + 1); e.preventDefault(); }
    else if (e.key === "k") { focusItem(current - 1); e.preventDefault(); }
    else if (e.key === "e") { const t = form.querySelector("textarea"); if (t) { t.focus(); e.preventDefault(); } }
    else if (e.key === "s") { form.requestSubmit(); e.preventDefault(); }
  });
  if (items.length && document.body.dataset.page === "queue") focusItem(0);
}

document.addEventListener("DOMContentLoaded", () => {
  startLive();
  confirmForms();
  reviewShortcuts();
});
