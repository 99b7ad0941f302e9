// Tether's dashboard: the live parts of the server-rendered pages (api/ui.py).
// Data from jobs is only ever set as text (textContent), never parsed as HTML.
"use strict";

(() => {
  document.documentElement.classList.add("js"); // its buttons work: show them (ui.css)
  const page = document.body.dataset.page;
  const csrf = document.body.dataset.csrf || "";

  // JSON read as its text says: a number JavaScript writes otherwise is
  // kept as api/ui.py's `pretty` (Python) writes it, where the browser can
  // (`JSON.rawJSON` and a reviver's `source`): an integer past 2^53 whole,
  // a float as Python's `repr` (`1.0`, `1e+16`). Else a live redraw showed
  // an order id rounded and `1.0` as `1` (found by a QA pass, 2026-12-07).
  function pyFloat(value) {
    if (Object.is(value, -0)) return "-0.0";
    const [mantissa, power] = value.toExponential().split("e");
    const e = Number(power);
    const sign = value < 0 ? "-" : "";
    const digits = mantissa.replace("-", "").replace(".", "");
    if (e < -4 || e >= 16) {
      const m = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
      return `${sign}${m}e${e < 0 ? "-" : "+"}${String(Math.abs(e)).padStart(2, "0")}`;
    }
    if (e < 0) return `${sign}0.${"0".repeat(-e - 1)}${digits}`;
    return `${sign}${digits.slice(0, e + 1).padEnd(e + 1, "0")}.${digits.slice(e + 1) || "0"}`;
  }
  function exact(key, value, context) {
    if (typeof value !== "number" || !JSON.rawJSON || !context || context.source === undefined) return value;
    const source = context.source;
    const written = /[.eE]/.test(source) ? pyFloat(value) : Number.isSafeInteger(value) ? null : source;
    return written === null || written === String(value) ? value : JSON.rawJSON(written);
  }
  // (A number so kept is a raw JSON object, not a number: a float field such
  // as `timeout` read for arithmetic takes `Number(x.rawJSON ?? x)`. Safe
  // integers, as `attempt` and `seq`, stay numbers.)
  const readJSON = (text) => JSON.parse(text, exact);
  const dataNode = document.getElementById("page-data");
  const data = dataNode ? readJSON(dataNode.textContent) : {};

  // ── formatting: as api/ui.py's `span`, `took`, `clock` ─────────────────────

  function span(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    for (const [unit, size, sub, subsize] of [["d", 86400, "h", 3600], ["h", 3600, "m", 60]]) {
      if (s >= size) {
        const rest = Math.floor((s % size) / subsize);
        return `${Math.floor(s / size)}${unit}` + (rest ? ` ${rest}${sub}` : "");
      }
    }
    return s >= 60 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${s}s`;
  }
  const age = (iso) => (iso ? span((Date.now() - Date.parse(iso)) / 1000) : "");
  // When the job's attempt began, as core/models.py's `attempt_began`: its
  // creation, or for a later attempt its deadline less its timeout (a raw
  // JSON object when the exact reader kept it: a float such as `3600.0`).
  const began = (job) =>
    job.attempt > 1 && job.deadline && job.timeout != null
      ? Date.parse(job.deadline) - 1000 * Number(job.timeout.rawJSON ?? job.timeout)
      : Date.parse(job.created_at);
  const took = (job) => (job.finished_at ? span((Date.parse(job.finished_at) - began(job)) / 1000) : "");
  const clock = (iso) => (iso ? new Date(iso).toLocaleString(undefined, { timeZoneName: "short" }) : "");

  // JSON as api/ui.py's `pretty` and `compact` write it: each character
  // Python's str.isprintable refuses but the layout's newlines (a
  // bidirectional override, a zero-width or tag character) as its escape.
  const unit = (code) => `\\u${code.toString(16).padStart(4, "0")}`;
  const visible = (text) =>
    text.replace(/(?![ \n])[\p{C}\p{Z}]/gu, (c) =>
      [...Array(c.length).keys()].map((i) => unit(c.charCodeAt(i))).join(""),
    );
  // At most SHOWN characters of it, as api/ui.py's `pretty` (a megabyte
  // nested deep is tens of megabytes indented).
  const SHOWN = 100000;
  const CUT_NOTE = "\n… (cut: the page shows the first 100,000 characters; GET /jobs/{id} has it whole)";
  const pretty = (value) => {
    const text = JSON.stringify(value, null, 2) ?? "null";
    if (text.length <= SHOWN) return visible(text);
    const end = /[\uD800-\uDBFF]/.test(text[SHOWN - 1]) ? SHOWN - 1 : SHOWN;
    return visible(text.slice(0, end)) + CUT_NOTE;
  };
  const compact = (value) => visible(JSON.stringify(value));

  // What an event says of the job, for its dot's colour (api/ui.py's `outcome`).
  function outcome(event) {
    const data = event.data || {};
    if (event.type === "finished") return String(data.state ?? "");
    if (event.type !== "callback") return "";
    return ["accepted", "duplicate"].includes(data.verdict) ? String(data.status ?? "") : String(data.verdict);
  }

  function make(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else node.setAttribute(key, value);
    }
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }
  const badge = (state) => make("span", { class: `badge state-${state}`, text: state });
  const tags = (job) => (job.tags || []).map((t) => make("span", { class: "tag", text: t }));
  const jobLink = (id) => `/ui/jobs/${encodeURIComponent(id)}`;
  const ENDED_LOOK = 5000; // ms between looks at an ended job (run again elsewhere?) or a running one
  const SUMMARY_LOOK = 5000; // ms between reloads of the list's summary, besides those its changes ask

  function refreshTimes() {
    for (const node of document.querySelectorAll("time[data-age]")) {
      node.textContent = age(node.getAttribute("datetime"));
    }
    for (const node of document.querySelectorAll("time[data-clock]")) {
      node.textContent = clock(node.getAttribute("datetime"));
    }
  }

  function showLive(on) {
    const live = document.getElementById("live");
    if (live) {
      live.hidden = false;
      live.classList.toggle("off", !on);
      live.textContent = on ? "live" : "reconnecting…";
    }
  }

  // The session ended (its token was removed, it expired, it was signed out
  // of in another tab): the page says so and how to go on, where it said
  // "live", and follows nothing more (`streams`: what `watch` holds open).
  const signInAgain = () => make("a", { href: location.pathname + location.search, text: "sign in again" });
  const streams = new Set();
  let signedOut = false;
  function showSignedOut() {
    signedOut = true;
    for (const stream of [...streams]) stream.close();
    // Its buttons too: they went on working after a sign-in in another tab
    // (that session's), each refused for this page's CSRF token (a QA pass).
    for (const button of document.querySelectorAll("#cancel, #retry, #retry-all")) button.disabled = true;
    const live = document.getElementById("live");
    if (live) {
      live.hidden = false;
      live.classList.add("off");
      live.replaceChildren("signed out: ", signInAgain());
    }
  }
  // (Given up after 10 s: a service that answers nothing left a stream's
  // reopening waiting on this for good.)
  async function sessionEnded() {
    const signal = AbortSignal.timeout(10000);
    const answer = await fetch("/jobs?limit=1", { credentials: "same-origin", signal }).catch(() => null);
    return answer !== null && answer.status === 401;
  }
  // A read of the page's answered 401: the session ended. Each read says so,
  // not only a stream's: a summary reload, a job's reread and the look at an
  // ended job's page failed silently, the counts froze and an ended job's
  // page said nothing (found by an exploratory QA pass of the dashboard).
  function refused(answer) {
    if (answer === null || answer.status !== 401) return false;
    showSignedOut();
    return true;
  }
  // A change refused for this page's CSRF token: the session the page was
  // made in was replaced (signed out, and in again in another tab).
  const replaced = (answer, said) =>
    answer.status === 403 && typeof said?.error?.message === "string" && said.error.message.startsWith("missing or wrong X-CSRF-Token");
  const reloadLink = () => make("a", { href: location.pathname + location.search, text: "reload the page" });
  // A page shown without a session (the sign-in form, where "Sign out" leads)
  // tells the service's other tabs, which ask whether theirs ended too: their
  // streams, opened with the cookie, would go on until it expires.
  const tabs = typeof BroadcastChannel === "function" ? new BroadcastChannel("tether-session") : null;
  if (tabs && page === "sign-in") tabs.postMessage("signed-out");
  else if (tabs) {
    tabs.addEventListener("message", async () => {
      if (!signedOut && (await sessionEnded())) showSignedOut();
    });
  }

  // A stream of the service's (`url()` names it, read again at each opening;
  // `on`: a listener per event type). The browser's EventSource reconnects by
  // itself after a network error, never after an HTTP error (a 503
  // `too_many_streams`, a 401 once the session ended): then it is closed, and
  // opened again here after a wait, unless the session ended. `failed`, if
  // given, is asked first on each error and ends the stream by returning true.
  const REOPEN = [1000, 2000, 5000, 10000, 30000]; // ms, one after another, then the last
  // A service that keeps its connections but answers nothing (hung, or
  // paused with SIGSTOP) leaves an open stream quiet, with no error: so a
  // stream that brought nothing for QUIET ms, not even the `ping` the
  // service sends after 15 s of silence, is taken for lost: the page says
  // "reconnecting…" and opens it again, which says "live" once the service
  // answers. (Keep-alives were comments, which a page cannot see, and such
  // a page said "live" for good: an exploratory QA pass.) Looked at every
  // QUIET_LOOK ms; a page asleep or in the background looks late, not wrongly.
  const QUIET = 35000;
  const QUIET_LOOK = 5000;
  function watch(url, on, failed = () => false) {
    let source = null;
    let tries = 0;
    let timer = null;
    let over = false;
    let heard = 0; // when the stream last brought anything (or was opened)
    const look = setInterval(() => {
      if (over || signedOut || source === null || source.readyState === EventSource.CLOSED) return;
      if (performance.now() - heard < QUIET) return;
      source.close();
      showLive(false);
      clearTimeout(timer);
      timer = setTimeout(open, REOPEN[0]);
    }, QUIET_LOOK);
    function open() {
      heard = performance.now();
      source = new EventSource(url());
      source.addEventListener("ping", () => (heard = performance.now()));
      source.addEventListener("open", () => {
        heard = performance.now();
        tries = 0;
        showLive(true);
      });
      source.addEventListener("error", async () => {
        if (over || failed()) return;
        showLive(false); // at once: the look at the session may get no answer
        if (source.readyState !== EventSource.CLOSED) return;
        source.close();
        if (await sessionEnded()) return over || showSignedOut();
        if (!over) timer = setTimeout(open, REOPEN[Math.min(tries++, REOPEN.length - 1)]);
      });
      for (const [type, listener] of Object.entries(on)) {
        source.addEventListener(type, (event) => {
          heard = performance.now();
          listener(event);
        });
      }
    }
    open();
    const handle = {
      close() {
        over = true;
        clearTimeout(timer);
        clearInterval(look);
        source.close();
        streams.delete(handle);
      },
    };
    streams.add(handle);
    return handle;
  }

  // ── the jobs list ──────────────────────────────────────────────────────────

  function row(job) {
    const cell = (label, ...content) => make("td", { "data-label": label }, ...content);
    const created = make("time", { "data-age": "", datetime: job.created_at, title: job.created_at });
    created.textContent = age(job.created_at);
    const tr = make(
      "tr",
      { "data-id": job.id, "data-created": job.created_at, "data-state": job.state, "data-attempt": job.attempt },
      make("td", { "data-label": "Job", class: "id" }, make("a", { href: jobLink(job.id), text: job.id })),
      cell("State", badge(job.state)),
      cell("Backend", job.backend),
      cell("Tags", ...tags(job)),
      make("td", { "data-label": "Attempt", class: "num", text: job.attempt ?? "" }),
      cell("Age", created),
      cell("Duration", took(job)),
    );
    return tr;
  }

  function matches(job, filters) {
    const any = (values, value) => values.length === 0 || values.includes(value);
    const jobTags = job.tags || [];
    return (
      any(filters.state, job.state) &&
      any(filters.backend, job.backend) &&
      filters.tag.every((t) => jobTags.includes(t))
    );
  }

  // `old` replaced by `fresh`, unless they are alike; a link or button
  // focused in it is focused again in the new one (the same `href`, or
  // `id`): the summary is reloaded every 5 s, and a keyboard's place in it
  // was lost each time (found by a QA pass, 2026-12-07).
  function swap(old, fresh) {
    if (old.isEqualNode(fresh)) return;
    const focused = old.contains(document.activeElement) ? document.activeElement : null;
    const key = (node) => node.getAttribute("href") ?? (node.id || null);
    const was = focused && focused !== old ? key(focused) : null;
    old.replaceWith(fresh);
    if (was === null) return;
    const again = [...fresh.querySelectorAll("a[href], button, [tabindex]")].find((n) => key(n) === was);
    if (again) again.focus({ preventScroll: true });
  }

  let summaryTimer = null;
  function reloadSummary() {
    // The summary is server-rendered (and escaped there): swap the fresh one in.
    if (summaryTimer || signedOut) return;
    summaryTimer = setTimeout(async () => {
      summaryTimer = null;
      // The list's own query: the counts' links keep its filters.
      const url = `/ui/summary${location.search}`;
      const answer = await fetch(url, { credentials: "same-origin" }).catch(() => null);
      if (refused(answer) || !answer || !answer.ok) return;
      const doc = new DOMParser().parseFromString(await answer.text(), "text/html");
      const fresh = doc.getElementById("summary");
      const old = document.getElementById("summary");
      if (fresh && old) swap(old, document.adoptNode(fresh));
    }, 1500);
  }

  function jobsPage() {
    const body = document.getElementById("jobs");
    const empty = document.getElementById("empty");
    const { filters, limit, cursor } = data;

    // Retry all on this page: the failed, timed-out and canceled jobs the
    // list shows, each with the attempt it should be at afterwards (so a
    // job retried elsewhere meanwhile starts nothing more), one request at
    // a time; the button shows while there is one.
    const retryAll = document.getElementById("retry-all");
    const ended = () => [...body.rows].filter((tr) => data.retryable.includes(tr.dataset.state));
    function offer() {
      if (retryAll) retryAll.hidden = ended().length === 0;
    }
    const retried = document.getElementById("retried");
    function report(done, already, refusals, asked, ...more) {
      retried.hidden = false;
      retried.classList.toggle("error", refusals.length > 0);
      const list = (pairs) =>
        make("ul", {}, ...pairs.map(([id, why]) => make("li", {}, make("a", { href: jobLink(id), text: id }), `: ${why}`)));
      retried.replaceChildren(
        `${done} of ${asked} job${asked === 1 ? "" : "s"} run again, each at its next attempt.`,
        ...more,
        // answered 200 as well: another request had run that attempt, and it ended
        ...(already.length ? [` Already run again elsewhere (${already.length}):`, list(already)] : []),
        ...(refusals.length ? [` Refused (${refusals.length}):`, list(refusals)] : []),
      );
    }
    async function retryEach() {
      const chosen = ended().map((tr) => [tr.dataset.id, Number(tr.dataset.attempt || 1) + 1]);
      const n = chosen.length;
      const question = `Run the ${n} failed, timed-out or canceled job${n === 1 ? "" : "s"} on this page again, each as its next attempt?`;
      if (n === 0 || !window.confirm(question)) return;
      let done = 0;
      const already = [];
      const refusals = [];
      for (const [i, [id, attempt]] of chosen.entries()) {
        retried.hidden = false;
        retried.classList.remove("error");
        retried.textContent = `Retrying ${i + 1} of ${n}…`;
        const answer = await fetch(`/jobs/${encodeURIComponent(id)}/retry`, {
          method: "POST",
          credentials: "same-origin",
          headers: { "content-type": "application/json", "x-csrf-token": csrf },
          body: JSON.stringify({ attempt }),
        }).catch(() => null);
        if (refused(answer)) {
          return report(done, already, refusals, n, " The session has ended, the others were not sent: ", signInAgain(), ".");
        }
        if (answer && answer.ok) {
          const job = await answer.json().catch(() => null);
          if (job && data.retryable.includes(job.state)) already.push([id, `attempt ${job.attempt} ended ${job.state}`]);
          else done += 1;
          continue;
        }
        const said = answer && (await answer.json().catch(() => null));
        if (answer && replaced(answer, said)) {
          const why = " This page's session was replaced by a newer sign-in, the others were not sent: ";
          return report(done, already, refusals, n, why, reloadLink(), ".");
        }
        const error = said && said.error;
        const why =
          answer === null
            ? "no answer from the service (reload to see whether it changed)"
            : error
              ? error.message
              : `the service answered ${answer.status}`;
        refusals.push([id, why]);
      }
      report(done, already, refusals, n);
    }
    if (retryAll) {
      retryAll.addEventListener("click", async () => {
        retryAll.disabled = true;  // a double-click asks once
        try {
          await retryEach();
        } finally {
          retryAll.disabled = signedOut;
        }
      });
    }

    function upsert(job) {
      const old = [...body.rows].find((tr) => tr.dataset.id === job.id);
      if (!matches(job, filters)) {
        if (old) old.remove();
      } else if (old) {
        swap(old, row(job));
      } else {
        // Before the first row not newer: the list is newest first by when
        // each job was made, and a job made in the same millisecond as one
        // shown is, when it arrives live, almost always the later one (a QA
        // pass, 2026-12-07, saw a burst's twins in the other order).
        const created = Date.parse(job.created_at);
        const later = [...body.rows].find((tr) => Date.parse(tr.dataset.created) <= created);
        if (later) later.before(row(job));
        else body.append(row(job));
      }
      empty.hidden = body.rows.length > 0;
      offer();
    }

    const query = new URLSearchParams();
    for (const [name, values] of Object.entries(filters)) {
      for (const value of values) query.append(name, value);
    }
    query.set("limit", limit);
    if (cursor) query.set("cursor", cursor);
    // The counts and the jobs waiting longest are of every job, not only
    // this page's: reloaded as often as a look, while the tab is shown, and
    // at once when it is shown again. A filtered view's stream sends none of
    // the other jobs, and its summary never moved (found by an exploratory
    // QA pass of the dashboard).
    setInterval(() => {
      if (document.visibilityState === "visible") reloadSummary();
    }, SUMMARY_LOOK);
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") reloadSummary();
    });

    watch(() => `/jobs?${query}`, {
      job: (message) => {
        upsert(JSON.parse(message.data));
        reloadSummary();
      },
      // Off the page: changed out of the filters, pushed off by newer jobs, deleted.
      left: (message) => {
        const { id } = JSON.parse(message.data);
        const old = [...body.rows].find((tr) => tr.dataset.id === id);
        if (old) old.remove();
        empty.hidden = body.rows.length > 0;
        offer();
        reloadSummary();
      },
      // The page as the stream (re)opened on it: rows that left it before
      // (while the page loaded, or the stream was down) go.
      page: (message) => {
        const ids = new Set(JSON.parse(message.data).ids);
        for (const tr of [...body.rows]) if (!ids.has(tr.dataset.id)) tr.remove();
        empty.hidden = body.rows.length > 0;
        offer();
      },
    });

    // Empty filter inputs stay out of the URL.
    const form = document.querySelector("form.filters");
    form.addEventListener("submit", () => {
      for (const input of form.querySelectorAll("input:not([type=checkbox])")) {
        if (!input.value) input.disabled = true;
      }
    });
  }

  // ── one job ────────────────────────────────────────────────────────────────

  function jobPage() {
    let job = data.job;
    let after = data.after;
    let stream = null;
    const ended = (j) => !data.cancelable.includes(j.state);
    const events = document.getElementById("events");

    function message(text, error = false, ...more) {
      const node = document.getElementById("message");
      node.hidden = !text;
      node.replaceChildren(text, ...more);
      node.classList.toggle("error", error);
    }

    // The job is no longer stored (retention deleted it): nothing more to
    // follow or do.
    let deleted = false;
    function gone() {
      deleted = true;
      stop();
      for (const id of ["cancel", "retry"]) {
        const button = document.getElementById(id);
        if (button) button.hidden = true;
      }
      message(`Job ${job.id} is no longer stored (retention deletes finished jobs): what this page shows is as it was.`, true);
    }

    function setTime(name, iso) {
      const node = document.querySelector(`[data-field="${name}"]`);
      if (node) {
        node.setAttribute("datetime", iso || "");
        node.setAttribute("title", iso || "");
        node.textContent = clock(iso);
      }
    }

    function show(fresh) {
      job = fresh;
      const state = document.querySelector('[data-field="state"]');
      state.className = `badge state-${job.state}`;
      state.textContent = job.state;
      const set = (name, value) => {
        const node = document.querySelector(`[data-field="${name}"]`);
        if (node) node.textContent = value ?? "";
      };
      set("backend", job.backend);
      set("attempt", job.attempt);
      set("duration", took(job));
      setTime("updated_at", job.updated_at);
      setTime("finished_at", job.finished_at);
      setTime("heartbeat_at", job.heartbeat_at);
      setTime("deadline", job.deadline);
      const tagged = document.querySelector('[data-field="tags"]');
      if (tagged) tagged.replaceChildren(...tags(job));
      const run = document.querySelector('[data-field="run_page_url"]');
      const url = (job.external || {}).run_page_url;
      run.replaceChildren();
      if (typeof url === "string" && /^https?:\/\//i.test(url)) {
        run.append(make("a", { href: url, target: "_blank", rel: "noopener noreferrer", text: url }));
      }
      for (const block of document.querySelectorAll("[data-block]")) {
        const value = job[block.dataset.block];
        block.hidden = value === null || value === undefined;
        // Only a block that changed: a redraw loses what is selected in it
        // (a running job's heartbeats move the job, not its params).
        const pre = block.querySelector("pre");
        const text = pretty(value ?? null);
        if (pre.textContent !== text) pre.textContent = text;
      }
      const cancel = document.getElementById("cancel");
      const retry = document.getElementById("retry");
      if (cancel) cancel.hidden = !data.cancelable.includes(job.state);
      if (retry) retry.hidden = !data.retryable.includes(job.state);
      const winding = document.getElementById("winding-up");
      winding.textContent = data.winding_up[job.winding_up] || "";
      winding.hidden = !job.winding_up;
    }

    function item(event) {
      const at = make("time", { "data-clock": "", datetime: event.at, title: event.at });
      at.textContent = clock(event.at);
      const verdict = event.data && event.data.verdict !== undefined;
      const hasData = event.data && Object.keys(event.data).length > 0;
      const said = outcome(event);
      return make(
        "li",
        { class: `event type-${event.type}` + (said ? ` outcome-${said}` : ""), "data-seq": event.seq },
        at,
        " ",
        make("span", { class: "etype", text: event.type }),
        verdict ? " " : null,
        verdict ? make("span", { class: "verdict", text: String(event.data.verdict) }) : null,
        " ",
        make("span", { class: "attempt", text: `attempt ${event.attempt}` }),
        hasData ? " " : null,
        hasData ? make("code", { class: "edata", text: compact(event.data) }) : null,
      );
    }

    let reading = null;
    function reread() {
      // One read of the job for a burst of events.
      if (reading) return;
      reading = setTimeout(async () => {
        reading = null;
        const answer = await fetch(`/jobs/${encodeURIComponent(job.id)}`, {
          credentials: "same-origin",
        }).catch(() => null);
        if (answer && answer.status === 404) return gone();
        if (refused(answer) || !answer || !answer.ok) return;
        const fresh = readJSON(await answer.text());
        // Unchanged: leave the page as it is (a redraw loses what is selected).
        if (JSON.stringify(fresh) !== JSON.stringify(job)) show(fresh);
      }, 100);
    }

    function stop() {
      if (stream) stream.close();
      stream = null;
      showLive(false);
      document.getElementById("live").hidden = true;
    }

    function follow() {
      if (stream || deleted) return;
      // The server ends the stream with `end` once nothing more is due after
      // `finished` (the notification's tries, a run that could not be
      // stopped). A stream that breaks on an ended job is left to the
      // interval below, which reads what came after `after`; on a running
      // one it is opened again, after the last event the page has.
      const on = { end: stop };
      for (const type of data.event_types) {
        on[type] = (message) => {
          const event = readJSON(message.data);
          if (event.seq <= after) return;
          after = event.seq;
          events.append(item(event));
          reread();
        };
      }
      const cursor = () => after.toString(16).padStart(16, "0");
      const id = encodeURIComponent(job.id);
      stream = watch(() => `/jobs/${id}/events?cursor=${cursor()}`, on, () => ended(job) && (stop(), true));
    }

    // From the confirmation to the answer, the buttons take no click: a
    // double-click on Cancel asked twice, sent two requests, and the second's
    // 409 said "Cancel refused" of a cancel that worked (found by an
    // exploratory QA pass of the dashboard).
    let acting = false;
    function buttons(disabled) {
      for (const id of ["cancel", "retry"]) {
        const button = document.getElementById(id);
        if (button) button.disabled = disabled || signedOut;
      }
    }
    async function act(action) {
      if (acting) return;
      acting = true;
      buttons(true);
      try {
        await ask(action);
      } finally {
        acting = false;
        buttons(false);
      }
    }

    // The question, then the request's body; null when the answer was no.
    // Cancel's question takes a reason, kept in the job's error message, as
    // long as the API takes it (counted in characters, as it counts them).
    function question(action) {
      const next = (job.attempt || 1) + 1;
      if (action === "retry") {
        return window.confirm(`Run job ${job.id} again, as attempt ${next}?`) ? { attempt: next } : null;
      }
      const said = window.prompt(
        `Cancel job ${job.id}? Its backend is asked to stop the run.\n\n` +
          `Reason (optional, at most ${data.reason_max} characters):`,
        "",
      );
      if (said === null) return null;
      const reason = said.trim();
      const length = [...reason].length;
      if (length > data.reason_max) {
        message(`Not canceled: a reason may have ${data.reason_max} characters, this one has ${length}.`, true);
        return null;
      }
      return reason ? { reason } : {};
    }

    async function ask(action) {
      const body = question(action);
      if (body === null) return;
      const name = action === "cancel" ? "Cancel" : "Retry";
      // A retry of a job still winding up waits for it, up to 10 s: say so
      // (the button stayed disabled with nothing said, a QA pass, 2026-12-07),
      // also when the page has not heard of it yet: a retry just after a
      // cancel may wait before the job says so (a second QA pass).
      const WAITING = "Retrying: waiting for the job to wind up (at most 10 s)…";
      if (action === "retry" && job.winding_up) message(WAITING);
      const slow = action === "retry" ? setTimeout(() => message(WAITING), 1000) : null;
      const answer = await fetch(`/jobs/${encodeURIComponent(job.id)}/${action}`, {
        method: "POST",
        credentials: "same-origin",
        headers: { "content-type": "application/json", "x-csrf-token": csrf },
        body: JSON.stringify(body),
      }).catch(() => null);
      clearTimeout(slow);
      if (answer === null) {
        // Not sent, or sent and its answer lost: the job's page tells which.
        message(`${name}: no answer from the service. Reload to see whether the job changed.`, true);
        return;
      }
      const said = await answer.text().then(readJSON).catch(() => null);
      if (answer.status === 401) {
        message(`${name} refused: the session has ended: `, true, signInAgain());
        showSignedOut();
        return;
      }
      if (answer.status === 404) return gone();
      if (replaced(answer, said)) {
        message(`${name} refused: this page's session was replaced by a newer sign-in: `, true, reloadLink());
        return;
      }
      const state = said && said.error && said.error.details ? said.error.details.state : null;
      if (answer.status === 409 && action === "cancel" && state === "canceled") {
        // Canceled already (by another page, the API, or this page's own
        // request whose answer was lost): what was asked is done.
        message("Already canceled.");
        reread();
        return;
      }
      if (!answer.ok) {
        const why = said && said.error ? said.error.message : `the service answered ${answer.status}`;
        message(`${name} refused: ${why}`, true);
        return;
      }
      show(said);
      // A retry naming its attempt is answered 200 whether this request
      // started it or another had (the CLI, another page): "started" was
      // untrue of the second (found by a QA pass of the dashboard).
      if (action === "cancel") message("Canceled.");
      else if (ended(said)) message(`Attempt ${said.attempt} was already run: ${said.state}.`);
      else message(`Attempt ${said.attempt} is under way.`);
      follow();
    }

    // An ended job may be run again from elsewhere (the API, the CLI, another
    // page): look now and then, and follow its new attempt. A running one's
    // heartbeats move its last heartbeat and progress with no event (one a
    // minute at most, when the progress changed): look at it as often.
    // Events filed after `finished` (the completion notification's, a run
    // that could not be stopped) come on the stream while it lasts; a page
    // opened on an ended job, or a stream that broke, reads them here.
    let looking = false;  // one look at a time: a service that never answers piles up none
    setInterval(async () => {
      if (document.hidden || deleted || signedOut || looking) return;
      if (stream) {
        // An ended job's `winding_up` comes with no event (a stop held after
        // the end): look for it while the stream lasts (a cancel's page
        // never said "Still winding up", a QA pass, 2026-12-07).
        if (job.state === "running" || ended(job)) reread();
        return;
      }
      const id = encodeURIComponent(job.id);
      looking = true;
      const answer = await fetch(`/jobs/${id}`, { credentials: "same-origin" }).catch(() => null);
      looking = false;
      if (stream) return;  // opened meanwhile (a retry): it says whether the page is live
      if (answer && answer.status === 404) return gone();
      if (refused(answer)) return;
      // With no stream, this look is what tells that the service cannot be
      // reached: it says so where a stream would ("reconnecting…"), and
      // hides that again once answered. An ended job's page said nothing,
      // as if what it showed were current (found by a QA pass of the dashboard).
      const lost = answer === null || answer.status >= 500;
      if (lost) showLive(false);
      else if (!stream) document.getElementById("live").hidden = true;
      if (!answer || !answer.ok) return;
      const fresh = readJSON(await answer.text());
      // (A stop recorded moves no `updated_at`: `winding_up` says it.)
      const moved = fresh.updated_at !== job.updated_at || fresh.winding_up !== job.winding_up;
      if (fresh.attempt !== job.attempt || moved) {
        show(fresh);
        follow();
        return;
      }
      const cursor = after.toString(16).padStart(16, "0");
      const later = await fetch(`/jobs/${id}/events?cursor=${cursor}`, {
        credentials: "same-origin",
        headers: { accept: "application/json" },
      }).catch(() => null);
      if (refused(later) || !later || !later.ok || stream) return;
      for (const event of readJSON(await later.text()).items) {
        if (event.seq <= after) continue;
        after = event.seq;
        events.append(item(event));
      }
    }, ENDED_LOOK);

    const cancel = document.getElementById("cancel");
    const retry = document.getElementById("retry");
    if (cancel) cancel.addEventListener("click", () => act("cancel"));
    if (retry) retry.addEventListener("click", () => act("retry"));
    if (!ended(job)) follow();
  }

  refreshTimes();
  setInterval(refreshTimes, 10000);
  if (page === "jobs") jobsPage();
  if (page === "job") jobPage();
})();
