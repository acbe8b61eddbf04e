// The run browser's page script. Everything from the data goes into the
// page as text (textContent), never as markup: a step error that contains
// `<script>` is shown, not run.
"use strict";

const main = document.getElementById("main");

// Bidi controls in data could make a text read as another (`gnp.exe` shown
// as `exe.png`): they are shown as their code instead.
function plain(text) {
  return String(text).replace(/[\u202A-\u202E\u2066-\u2069\u200E\u200F]/g,
    (c) => "<U+" + c.charCodeAt(0).toString(16).toUpperCase() + ">");
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(plain(c)));
  }
  return node;
}

function badge(status) {
  return el("span", { class: "badge s-" + status, "data-status": status }, status);
}

// Durations and times are integer milliseconds in reports.
function ms(total) {
  if (total === null || total === undefined) return "";
  return total >= 1000 ? (total / 1000).toFixed(2) + " s" : total + " ms";
}

function when(unixMs) {
  if (!unixMs) return "";
  return new Date(unixMs).toISOString().replace("T", " ").replace("Z", "");
}

async function getJson(url, options) {
  const res = await fetch(url, Object.assign({ credentials: "same-origin" }, options || {}));
  const body = await res.json().catch(() => ({ error: res.statusText }));
  if (!res.ok) throw new Error(body.error || res.statusText);
  return body;
}

function showError(e) {
  main.replaceChildren(el("p", { class: "error" }, String(e.message || e)));
}

// A page kept open says when the cluster stops answering, and stops saying
// it when it answers again.
function health(ok, e) {
  let banner = document.getElementById("unreachable");
  if (ok) { if (banner) banner.remove(); return; }
  if (!banner) {
    banner = el("p", { id: "unreachable", class: "banner" });
    document.body.insertBefore(banner, main);
  }
  banner.textContent = plain("Not up to date: " + (e && e.message || e) + " (trying again)");
}

// Redraws at most every 300 ms however fast events come.
function throttled(fn) {
  let pending = false;
  return () => {
    if (pending) return;
    pending = true;
    setTimeout(() => { pending = false; fn(); }, 300);
  };
}

function listen(url, onEvent) {
  const source = new EventSource(url);
  source.addEventListener("run", (m) => onEvent(JSON.parse(m.data)));
  return source;
}

// ---- the list of runs ----

const STATUSES = ["", "queued", "running", "paused", "completed", "failed", "compensation_failed", "cancelled", "quarantined"];

async function listView() {
  const params = new URLSearchParams(location.search);
  const status = el("select", { id: "status", "aria-label": "status" },
    ...STATUSES.map((s) => el("option", { value: s }, s || "any status")));
  status.value = params.get("status") || "";
  const flow = el("input", { id: "flow", placeholder: "flow", "aria-label": "flow", value: params.get("flow") || "" });
  const body = el("tbody", { id: "runs" });
  const more = el("button", { id: "more", hidden: "" }, "older runs");
  const fresh = el("button", { id: "fresh", hidden: "" }, "new activity: show the newest runs");
  let cursor = null;
  let pages = 1;

  async function load(append) {
    const q = new URLSearchParams();
    if (status.value) q.set("status", status.value);
    if (flow.value) q.set("flow", flow.value);
    if (append && cursor) q.set("cursor", cursor);
    const page = await getJson("/api/runs?" + q);
    const rows = page.runs.map((r) => el("tr", { "data-run": r.runId },
      el("td", { class: "id" }, el("a", { href: "/runs/" + r.runId }, r.runId)),
      el("td", {}, r.flow),
      el("td", {}, badge(r.status)),
      el("td", {}, when(r.startedAtMs)),
      el("td", {}, ms(r.durationMs)),
      el("td", {}, r.failedStep || "")));
    if (append) { body.append(...rows); pages += 1; } else { body.replaceChildren(...rows); pages = 1; fresh.setAttribute("hidden", ""); }
    cursor = page.nextCursor;
    if (cursor) more.removeAttribute("hidden"); else more.setAttribute("hidden", "");
  }

  function refilter() {
    const q = new URLSearchParams();
    if (status.value) q.set("status", status.value);
    if (flow.value) q.set("flow", flow.value);
    history.replaceState(null, "", q.toString() ? "?" + q : "/");
    load(false).catch(showError);
  }
  status.addEventListener("change", refilter);
  flow.addEventListener("change", refilter);
  more.addEventListener("click", () => load(true).catch(showError));
  fresh.addEventListener("click", () => load(false).catch(showError));

  main.replaceChildren(
    el("div", { class: "filters" }, status, flow, fresh),
    el("table", {},
      el("thead", {}, el("tr", {}, ...["run", "flow", "status", "started", "duration", "failed at"].map((h) => el("th", {}, h)))),
      body),
    more);
  await load(false);
  // Live: any run event reloads the first page (a new run, a status change),
  // unless older pages were added: then a button offers it.
  const reload = throttled(() => {
    if (pages > 1) { fresh.removeAttribute("hidden"); return; }
    load(false).then(() => health(true), (e) => health(false, e));
  });
  listen("/api/events", reload);
  setInterval(reload, 5000);
}

// ---- one run ----

async function runView() {
  const id = decodeURIComponent(location.pathname.split("/").pop());
  let ended = false;

  async function draw() {
    const data = await getJson("/api/runs/" + encodeURIComponent(id));
    const r = data.run;
    ended = ["completed", "failed", "compensation_failed", "cancelled", "quarantined"].includes(r.status);
    document.title = r.flow + " " + r.status + " · Orchestrix";

    const facts = el("dl", { class: "facts" },
      el("dt", {}, "run"), el("dd", { class: "mono", id: "run-id" }, r.runId),
      el("dt", {}, "flow"), el("dd", {}, r.flow + (r.version ? " (version " + r.version + ")" : "")),
      el("dt", {}, "status"), el("dd", { id: "run-status" }, badge(r.status)),
      el("dt", {}, "started"), el("dd", {}, when(r.startedAtMs)),
      el("dt", {}, "duration"), el("dd", {}, ms(r.durationMs)));
    if (r.error) facts.append(el("dt", {}, "error"), el("dd", { class: "error", id: "run-error" }, r.error));
    if (r.failedStep) facts.append(el("dt", {}, "failed at"), el("dd", {}, r.failedStep));
    if (r.paused) facts.append(el("dt", {}, "paused"), el("dd", {}, r.paused.step + " (" + r.paused.kind + ")"));
    if (data.traceUrl) facts.append(el("dt", {}, "trace"), el("dd", {}, el("a", { href: data.traceUrl, id: "trace" }, "open the trace")));

    const steps = el("tbody", { id: "steps" }, ...r.steps.map((s) => {
      const c = s.compensation;
      return el("tr", { "data-step": s.name },
        el("td", {}, s.name + (s.group ? " [" + s.group + "]" : "")),
        el("td", {}, badge(s.status)),
        el("td", { class: "attempts" }, String(s.attempts)),
        el("td", {}, ms(s.durationMs)),
        el("td", { class: "error" }, s.error || s.waiting || ""),
        el("td", { class: "compensation" }, c ? [c.attempts + " attempt(s)", c.error || ""].filter(Boolean).join(", ") : ""));
    }));

    // The rollback, in the order it ran: latest stage first.
    const undone = r.steps.map((s, i) => ({ s, i })).filter((x) => x.s.compensation).reverse();
    const rollback = undone.length
      ? el("ol", { id: "rollback" }, ...undone.map((x) => el("li", { "data-step": x.s.name },
          x.s.name + ": " + x.s.status + ", " + x.s.compensation.attempts + " attempt(s)" +
          (x.s.compensation.error ? " (" + x.s.compensation.error + ")" : ""))))
      : el("p", { class: "muted" }, "nothing was rolled back");

    const events = data.events.length
      ? el("ol", { class: "events", id: "events" }, ...data.events.map((e) =>
          el("li", {}, el("time", {}, new Date(e.atMs).toISOString().slice(11, 23)), e.text)))
      : el("p", { class: "muted" }, "no events seen by this browser (the run began before it started)");

    const acts = el("div", { class: "actions" });
    if (data.actions && !ended) {
      const act = (name) => el("button", { "data-action": name, type: "button" }, name);
      const buttons = r.status === "paused" ? [act("resume"), act("rollback"), act("cancel")] : [act("cancel")];
      for (const b of buttons) {
        b.addEventListener("click", () => {
          if (!confirm(b.dataset.action + " run " + id + "?")) return;
          getJson("/api/runs/" + encodeURIComponent(id) + "/" + b.dataset.action,
            { method: "POST", headers: { "content-type": "application/json" }, body: "{}" }).then(draw).catch(showError);
        });
      }
      acts.append(...buttons);
    }
    const operators = (r.actions || []).map((a) => el("li", {}, a.action + " by " + a.by + (a.reason ? ": " + a.reason : "")));
    const late = (r.late || []).map((l) => el("li", {}, l));

    main.replaceChildren(...[
      el("h1", {}, r.flow), facts, acts,
      el("h2", {}, "Steps"),
      el("table", {},
        el("thead", {}, el("tr", {}, ...["step", "status", "attempts", "duration", "last error", "compensation"].map((h) => el("th", {}, h)))),
        steps),
      el("h2", {}, "Rollback"), rollback,
      el("h2", {}, "Timeline"), events,
      operators.length ? el("h2", {}, "Operator actions") : null,
      operators.length ? el("ul", { id: "operators" }, ...operators) : null,
      late.length ? el("h2", {}, "Late answers (recorded, not applied)") : null,
      late.length ? el("ul", {}, ...late) : null,
    ].filter((n) => n !== null));
  }

  await draw();
  if (!ended) {
    const redraw = throttled(() => draw().then(() => health(true), (e) => health(false, e)));
    const source = listen("/api/events?run=" + encodeURIComponent(id), redraw);
    // Events are at most once: look again now and then, in case one is lost.
    const poll = setInterval(() => { if (ended) { clearInterval(poll); source.close(); } else redraw(); }, 2000);
  }
}

(document.body.dataset.view === "run" ? runView() : listView()).catch(showError);
