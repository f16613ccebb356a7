// Nexus dashboard: live over the /ws WebSocket (a snapshot, then deltas), polling /v1/* when the
// socket cannot connect. No framework, no build step. Every value from the server reaches the page
// as text (textContent, dataset, setAttribute), never as markup: model and backend names are
// untrusted.
"use strict";

(() => {
  const WINDOW = 300; // seconds the charts show
  const FEED_MAX = 100; // rows in the request feed
  const SEEN_MAX = 5000; // request ids remembered, so a request is counted once
  const POLL_MS = 3000; // polling period while the socket is down
  const STALE_MS = 10000; // a live socket silent this long is taken for dead (stats come each second)
  const BACKOFF_MIN = 1000;
  const BACKOFF_MAX = 30000;

  const state = {
    stats: null,
    backends: [],
    models: [],
    feed: [], // newest first
    pending: [], // feed entries not drawn yet, oldest first
    resetFeed: true,
    seen: new Set(),
    seenOrder: [],
    buckets: new Map(), // unix second -> {n, err, ok, sum, max}
    load: [], // {t, inFlight, queue}
    skew: 0, // server clock minus ours, in seconds
    version: "",
  };

  const $ = (id) => document.getElementById(id);
  const serverNow = () => Date.now() / 1000 + state.skew;

  // ---- DOM helpers: text only ---------------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (value === undefined || value === null) continue;
        if (key === "className") node.className = value;
        else if (key === "text") node.textContent = String(value);
        else if (key === "data") for (const [k, v] of Object.entries(value)) node.dataset[k] = String(v);
        else node.setAttribute(key, String(value));
      }
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function setText(id, value) {
    const node = $(id);
    const text = String(value);
    if (node.textContent !== text) node.textContent = text;
  }

  const numberFormat = new Intl.NumberFormat("en");
  const fmtInt = (v) => (v === null || v === undefined ? "–" : numberFormat.format(v));

  function fmtMs(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (v < 10) return `${v.toFixed(1)} ms`;
    if (v < 1000) return `${Math.round(v)} ms`;
    return `${(v / 1000).toFixed(v < 10000 ? 2 : 1)} s`;
  }

  // USD: cents above a dollar, three significant digits below (a request may cost $0.000012).
  function fmtUSD(v) {
    if (typeof v !== "number" || !Number.isFinite(v)) return "–";
    if (v === 0) return "$0.00";
    const size = Math.abs(v);
    if (size >= 1) return `$${v.toLocaleString("en", { minimumFractionDigits: 2, maximumFractionDigits: 2 })}`;
    const digits = Math.min(10, Math.max(2, 2 - Math.floor(Math.log10(size))));
    return `$${v.toFixed(digits)}`;
  }

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined) return "";
    const d = Math.floor(seconds / 86400);
    const h = Math.floor((seconds % 86400) / 3600);
    const m = Math.floor((seconds % 3600) / 60);
    if (d) return `up ${d}d ${h}h`;
    if (h) return `up ${h}h ${m}m`;
    if (m) return `up ${m}m`;
    return `up ${Math.floor(seconds)}s`;
  }

  function fmtClock(unix) {
    const t = new Date((unix - state.skew) * 1000);
    return t.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  }

  // ---- state changes ------------------------------------------------------------------------

  function remember(id) {
    if (state.seen.has(id)) return false;
    state.seen.add(id);
    state.seenOrder.push(id);
    if (state.seenOrder.length > SEEN_MAX) state.seen.delete(state.seenOrder.shift());
    return true;
  }

  function bucketOf(second) {
    let bucket = state.buckets.get(second);
    if (!bucket) {
      bucket = { n: 0, err: 0, ok: 0, sum: 0, max: 0 };
      state.buckets.set(second, bucket);
    }
    return bucket;
  }

  function isOk(o) {
    return o.status < 400 && !o.error_type;
  }

  function addRequest(o, count) {
    if (!o || typeof o.request_id !== "string" || !remember(o.request_id)) return;
    if (count) {
      const bucket = bucketOf(Math.floor(o.time));
      bucket.n += 1;
      if (isOk(o)) {
        bucket.ok += 1;
        bucket.sum += o.duration_ms;
        bucket.max = Math.max(bucket.max, o.duration_ms);
      } else {
        bucket.err += 1;
      }
    }
    state.feed.unshift(o);
    if (state.feed.length > FEED_MAX) state.feed.length = FEED_MAX;
    state.pending.push(o);
    if (state.pending.length > FEED_MAX) state.pending.splice(0, state.pending.length - FEED_MAX);
    dirty("feed", "summary", "charts");
  }

  function applyStats(stats, time) {
    if (!stats) return;
    state.stats = stats;
    const t = time || serverNow();
    state.load.push({ t, inFlight: stats.in_flight || 0, queue: stats.queue_depth || 0 });
    prune();
    dirty("summary", "charts", "spend", "keys");
  }

  function applyBackends(list) {
    state.backends = Array.isArray(list) ? list : [];
    dirty("backends", "matrix", "summary");
  }

  function applyModels(list) {
    state.models = Array.isArray(list) ? list : [];
    dirty("matrix", "summary");
  }

  function applySnapshot(data, time) {
    if (typeof time === "number") state.skew = time - Date.now() / 1000;
    state.version = data.version || "";
    state.feed = [];
    state.pending = [];
    state.resetFeed = true;
    state.seen.clear();
    state.seenOrder = [];
    state.buckets.clear();
    for (const [second, n, err, ok, sum, max] of (data.series && data.series.buckets) || []) {
      state.buckets.set(second, { n, err, ok, sum, max });
    }
    for (const o of data.history || []) addRequest(o, false); // already in the series
    state.pending = [];
    applyStats(data.stats, time);
    applyBackends(data.backends);
    applyModels(data.models);
    dirty("feed", "all");
  }

  function prune() {
    const start = Math.floor(serverNow()) - WINDOW - 1;
    for (const second of state.buckets.keys()) if (second < start) state.buckets.delete(second);
    while (state.load.length && state.load[0].t < start) state.load.shift();
  }

  function handle(msg) {
    switch (msg && msg.type) {
      case "snapshot":
        applySnapshot(msg.data || {}, msg.time);
        conn.attempt = 0;
        setLive(true);
        break;
      case "request":
        addRequest(msg.data, true);
        break;
      case "backends":
        applyBackends(msg.data);
        break;
      case "models":
        applyModels(msg.data);
        break;
      case "stats":
        if (typeof msg.time === "number") state.skew = msg.time - Date.now() / 1000;
        applyStats(msg.data, msg.time);
        break;
      default:
        break; // unknown kinds are for newer pages
    }
  }

  // ---- rendering (batched into animation frames) -------------------------------------------

  const dirtyParts = new Set();
  let frame = 0;

  function dirty(...parts) {
    for (const part of parts) dirtyParts.add(part);
    if (!frame) frame = requestAnimationFrame(render);
  }

  function render() {
    frame = 0;
    const all = dirtyParts.has("all");
    const want = (part) => all || dirtyParts.has(part);
    const parts = {
      summary: renderSummary,
      backends: renderBackends,
      matrix: renderMatrix,
      feed: renderFeed,
      charts: renderCharts,
      spend: renderSpend,
      keys: renderKeys,
    };
    const todo = Object.keys(parts).filter(want);
    dirtyParts.clear();
    for (const part of todo) {
      try {
        parts[part]();
      } catch (err) {
        console.error(`dashboard: drawing ${part} failed`, err);
      }
    }
  }

  function recentRate() {
    const now = Math.floor(serverNow());
    let n = 0;
    for (let s = now - 10; s < now; s++) n += (state.buckets.get(s) || { n: 0 }).n;
    return n / 10;
  }

  function renderSummary() {
    const s = state.stats;
    setText("version", state.version ? `v${state.version}` : "");
    const rate = recentRate();
    setText("s-rate", rate >= 10 ? Math.round(rate) : rate.toFixed(1));
    const healthy = state.backends.filter((b) => b.status === "healthy").length;
    setText("s-backends", `${healthy} / ${state.backends.length}`);
    $("s-backends").classList.toggle("bad", state.backends.length > 0 && healthy === 0);
    setText("s-models", fmtInt(state.models.length));
    if (!s) return;
    const totals = s.requests || {};
    setText("s-requests", fmtInt(totals.requests));
    const errors = totals.errors || 0;
    const share = totals.requests ? ` (${((100 * errors) / totals.requests).toFixed(1)}%)` : "";
    setText("s-errors", `${fmtInt(errors)} errors${share}`);
    const latency = totals.latency_ms || {};
    setText("s-p50", fmtMs(latency.p50));
    setText("s-p95", latency.p95 === null || latency.p95 === undefined ? "" : `p95 ${fmtMs(latency.p95)}`);
    setText("s-inflight", fmtInt(s.in_flight));
    const capacity = (s.backends || []).reduce((sum, b) => sum + (b.capacity || 0), 0);
    setText("s-capacity", capacity ? `of ${fmtInt(capacity)} slots` : "");
    setText("s-queue", fmtInt(s.queue_depth));
    $("s-queue").classList.toggle("bad", (s.queue_depth || 0) > 0);
    setText("uptime", fmtDuration(s.uptime_seconds));
  }

  const BUDGET_STATUSES = ["Normal", "SoftLimit", "HardLimit"];

  function renderSpend() {
    const s = state.stats;
    const budget = s && s.budget;
    const panel = $("spend");
    panel.hidden = !budget; // an older server: no spend to show
    if (!budget) return;
    const status = BUDGET_STATUSES.includes(budget.status) ? budget.status : "Normal";
    panel.dataset.status = status;
    setText("spend-status", status);
    setText("spend-month", budget.month ? `(${budget.month}, UTC)` : "");
    setText("spend-total", fmtUSD(budget.current_spending_usd));
    const limit = budget.monthly_limit_usd;
    const hasLimit = typeof limit === "number";
    setText("spend-limit", hasLimit ? `of ${fmtUSD(limit)} limit` : "no monthly limit");
    const used = hasLimit && typeof budget.utilization_percent === "number" ? budget.utilization_percent : 0;
    const box = $("spend-bar-box");
    box.hidden = !hasLimit;
    box.setAttribute("aria-valuenow", used.toFixed(1));
    $("spend-bar").style.width = `${Math.min(100, used).toFixed(1)}%`;
    const parts = hasLimit ? [`${used.toFixed(1)}% used`, `${fmtUSD(budget.remaining_usd)} left`, `soft limit ${budget.soft_limit_percent}%`, `at the limit: ${budget.hard_limit_action}`] : [];
    setText("spend-utilization", parts.join(" · "));
    setText("spend-reserved", budget.reserved_usd ? `${hasLimit ? "· " : ""}${fmtUSD(budget.reserved_usd)} reserved by calls in flight` : "");
    const rows = (s.backends || [])
      .filter((b) => typeof b.cost_usd === "number" && b.cost_usd > 0)
      .sort((a, b) => b.cost_usd - a.cost_usd);
    const total = budget.current_spending_usd || 0;
    const list = $("spend-backends");
    if (!rows.length) {
      list.replaceChildren(el("li", { className: "empty", text: "Nothing spent yet this month." }));
      return;
    }
    list.replaceChildren(
      ...rows.map((b) => {
        const fill = el("span");
        fill.style.width = `${total > 0 ? Math.min(100, (100 * b.cost_usd) / total).toFixed(1) : 0}%`;
        return el(
          "li",
          { data: { backend: b.name } },
          el("span", { className: "name", text: b.name, title: b.name }),
          el("span", { className: "num cost", text: fmtUSD(b.cost_usd) }),
          el("div", { className: "bar" }, fill),
        );
      }),
    );
  }

  // One row per client key: its month (requests, tokens, cost) and its limits. Hidden while
  // there are no keys (a home lab without [auth]) or the server is older than the panel.
  function renderKeys() {
    const s = state.stats;
    const keys = s && Array.isArray(s.keys) ? s.keys : [];
    const panel = $("keys");
    panel.hidden = !keys.length;
    if (!keys.length) return;
    setText("keys-month", s.budget && s.budget.month ? `(${s.budget.month}, UTC)` : "");
    $("keys-rows").replaceChildren(...keys.map(keyRow));
  }

  function keyLimits(k) {
    const limits = k.limits || {};
    const parts = [];
    if (typeof limits.rpm === "number") parts.push(`${fmtInt(limits.rpm)} rpm`);
    if (typeof limits.tpm === "number") parts.push(`${fmtInt(limits.tpm)} tpm`);
    const flying = `${fmtInt(k.in_flight || 0)}${typeof limits.max_concurrent === "number" ? ` / ${fmtInt(limits.max_concurrent)}` : ""} in flight`;
    parts.push(flying);
    return parts.join(" · ");
  }

  function keyRow(k) {
    const status = ["active", "revoked", "expired"].includes(k.status) ? k.status : "active";
    const about = [k.prefix ? `${k.prefix}…` : "", status === "active" ? "" : status].filter(Boolean).join(" · ");
    const budget = k.limits && typeof k.limits.monthly_budget_usd === "number" ? k.limits.monthly_budget_usd : null;
    let budgetInfo = null;
    if (budget !== null) {
      const used = budget > 0 ? Math.min(100, (100 * (k.cost_usd || 0)) / budget) : 0;
      const fill = el("span", { className: used >= 100 ? "full" : "" });
      fill.style.width = `${used.toFixed(1)}%`;
      budgetInfo = [
        el("div", { className: "sub budget", text: `of ${fmtUSD(budget)}` }),
        el("div", { className: "bar", role: "meter", "aria-label": `Share of ${k.name}'s monthly budget spent`, "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": used.toFixed(1) }, fill),
      ];
    }
    return el(
      "tr",
      { data: { key: k.name, status } },
      el(
        "td",
        { className: "key-name" },
        el("div", { className: "mono name", text: k.name }),
        about ? el("div", { className: "sub about", text: about }) : null,
        el("div", { className: "sub limits", text: keyLimits(k) }),
      ),
      el("td", { className: "num requests", text: fmtInt(k.requests) }),
      el("td", { className: "num tokens" }, el("div", { className: "total", text: fmtInt(k.total_tokens) }), el("div", { className: "sub split", text: `${fmtInt(k.prompt_tokens)} + ${fmtInt(k.completion_tokens)}` })),
      el("td", { className: "num cost" }, el("div", { className: "spent", text: fmtUSD(k.cost_usd) }), ...(budgetInfo || [])),
    );
  }

  function metric(label, value, extra) {
    return el("div", { className: "metric" }, el("div", { className: "k", text: label }), el("div", { className: "v", text: value }), extra);
  }

  function backendCard(b) {
    const capacity = b.capacity || 0;
    const used = capacity ? Math.min(1, (b.in_flight || 0) / capacity) : 0;
    const fill = el("span", { className: used >= 1 ? "full" : "" });
    fill.style.width = `${(used * 100).toFixed(1)}%`;
    const models = Array.isArray(b.models) ? b.models : [];
    const shown = models.slice(0, 8).map((m) => el("span", { className: "chip", text: m, title: m }));
    if (models.length > shown.length) shown.push(el("span", { className: "chip more", text: `+${models.length - shown.length} more` }));
    const where = [b.type, b.location, b.url].filter(Boolean).join(" · ");
    return el(
      "article",
      { className: "backend", data: { backend: b.name, status: b.status } },
      el("div", { className: "head" }, el("span", { className: "name", text: b.name }), el("span", { className: `status ${b.status}`, text: b.status })),
      el("div", { className: "where", text: where }),
      el(
        "div",
        { className: "metrics" },
        metric("Latency", fmtMs(b.latency_ms), el("div", { className: "k", text: b.probe_latency_ms == null ? "" : `probe ${fmtMs(b.probe_latency_ms)}` })),
        metric("In flight", `${fmtInt(b.in_flight)} / ${fmtInt(capacity)}`, el("div", { className: "bar" }, fill)),
        metric("Requests", fmtInt(b.requests)),
      ),
      models.length ? el("div", { className: "chips" }, ...shown) : el("div", { className: "k muted", text: "no models" }),
      b.status !== "healthy" && b.last_error ? el("div", { className: "error", text: b.last_error }) : null,
    );
  }

  function renderBackends() {
    const box = $("backends");
    if (!state.backends.length) {
      box.replaceChildren(el("p", { className: "empty", text: "No backends configured or discovered yet." }));
      return;
    }
    box.replaceChildren(...state.backends.map(backendCard));
  }

  const CAPS = [
    ["vision", "vision"],
    ["tools", "tools"],
    ["json_mode", "JSON"],
    ["embeddings", "embed"],
  ];

  function renderMatrix() {
    const table = $("matrix");
    const backends = state.backends;
    const info = new Map(state.models.map((m) => [m.id, m]));
    const ids = new Set(info.keys());
    for (const b of backends) for (const m of b.models || []) ids.add(m);
    const models = [...ids].sort();
    if (!models.length) {
      table.replaceChildren(el("tbody", null, el("tr", null, el("td", { className: "empty", text: "No models yet." }))));
      return;
    }
    const head = el("tr", null, el("th", { text: "Model" }), ...backends.map((b) => el("th", { className: "backend-col", text: b.name, title: `${b.name} (${b.status})` })));
    const rows = models.map((id) => {
      const m = info.get(id);
      const caps = m ? CAPS.filter(([key]) => m.capabilities && m.capabilities[key]).map(([, label]) => el("span", { className: "cap on", text: label })) : [];
      const ctx = m && m.context_length ? el("div", { className: "ctx", text: `${fmtInt(m.context_length)} tokens context` }) : null;
      const cells = backends.map((b) => {
        const has = (b.models || []).includes(id);
        const mark = has ? el("span", { className: `dot ${b.status}`, title: `${b.name}: ${b.status}` }) : el("span", { className: "none", text: "·" });
        return el("td", { className: "cell", data: { backend: b.name, has: has ? "1" : "0" } }, mark);
      });
      return el("tr", { data: { model: id } }, el("td", { className: "model" }, el("div", { className: "mono", text: id }), ctx, caps.length ? el("div", null, ...caps) : null), ...cells);
    });
    table.replaceChildren(el("thead", null, head), el("tbody", null, ...rows));
  }

  function feedRow(o) {
    const ok = isOk(o);
    const tokens = o.prompt_tokens == null && o.completion_tokens == null ? "–" : `${o.prompt_tokens || 0}+${o.completion_tokens || 0}`;
    const model = o.fallback_model ? `${o.model} → ${o.fallback_model}` : o.model || "–";
    const route = [o.key ? `key ${o.key}` : "", o.route_reason, o.attempts > 1 ? `${o.attempts} tries` : "", o.stream ? "stream" : ""].filter(Boolean).join(" · ");
    const priced = typeof o.cost_usd === "number";
    const via = [o.backend ? `via ${o.backend}` : "", priced ? fmtUSD(o.cost_usd) : ""].filter(Boolean).join(" · ");
    return el(
      "tr",
      { data: { requestId: o.request_id } },
      el("td", { className: "mono", text: fmtClock(o.time) }),
      el("td", { className: "model" }, el("div", { className: "mono", text: model }), el("div", { className: "via", text: via })),
      el("td", { className: "backend-name wide", text: o.backend || "–" }),
      el("td", null, el("span", { className: `code ${ok ? "ok" : "err"}`, text: o.status }), o.error_type && o.error_type !== `http_${o.status}` ? el("div", { className: "reason", text: o.error_type }) : null),
      el("td", { className: "num", text: fmtMs(o.duration_ms) }),
      el("td", { className: "num opt", text: fmtMs(o.ttft_ms) }),
      el("td", { className: "num opt", text: tokens }),
      el("td", { className: "num opt cost", text: priced ? fmtUSD(o.cost_usd) : "–" }),
      el("td", { className: "reason opt", text: route || "–" }),
    );
  }

  function renderFeed() {
    const body = $("feed-rows");
    if (state.resetFeed) {
      state.resetFeed = false;
      state.pending = [];
      body.replaceChildren(...state.feed.map(feedRow));
    } else if (state.pending.length) {
      const rows = state.pending.map((o) => {
        const row = feedRow(o);
        row.classList.add("new");
        return row;
      });
      state.pending = [];
      const placeholder = body.querySelector("tr.placeholder");
      if (placeholder) placeholder.remove();
      body.prepend(...rows.reverse());
      while (body.rows.length > FEED_MAX) body.lastElementChild.remove();
    }
    if (!body.rows.length) body.replaceChildren(el("tr", { className: "placeholder" }, el("td", { colspan: 9, className: "empty", text: "No requests yet." })));
  }

  // ---- charts: canvas, drawn by hand --------------------------------------------------------

  let palette = null;

  function colors() {
    if (!palette) {
      const css = getComputedStyle(document.documentElement);
      const get = (name) => css.getPropertyValue(name).trim();
      palette = { accent: get("--accent"), err: get("--err"), max: get("--max"), queue: get("--queue"), grid: get("--grid"), muted: get("--muted") };
    }
    return palette;
  }

  const axisNumber = (v) => (Number.isInteger(v) ? String(v) : String(Number(v.toFixed(2))));

  function niceCeil(v) {
    if (!(v > 0)) return 1;
    const p = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 4, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  function surface(canvas) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return null;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    return { ctx, width, height };
  }

  // Axes and grid; returns the plot area and mappers from (seconds ago, value) to pixels.
  function frameChart(s, yMax, format) {
    const c = colors();
    const { ctx, width, height } = s;
    ctx.font = "10px system-ui, sans-serif";
    const labels = [yMax, yMax / 2, 0].map(format);
    const left = Math.ceil(Math.max(...labels.map((l) => ctx.measureText(l).width))) + 8;
    const area = { left, right: width - 4, top: 6, bottom: height - 16 };
    ctx.strokeStyle = c.grid;
    ctx.fillStyle = c.muted;
    ctx.lineWidth = 1;
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    [yMax, yMax / 2, 0].forEach((v, i) => {
      const y = Math.round(area.bottom - (v / yMax) * (area.bottom - area.top)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(area.left, y);
      ctx.lineTo(area.right, y);
      ctx.stroke();
      ctx.fillText(labels[i], area.left - 5, y);
    });
    ctx.textBaseline = "alphabetic";
    ctx.textAlign = "left";
    ctx.fillText(`${WINDOW / 60} min ago`, area.left, height - 3);
    ctx.textAlign = "right";
    ctx.fillText("now", area.right, height - 3);
    const x = (ago) => area.right - (ago / WINDOW) * (area.right - area.left);
    const y = (v) => area.bottom - (Math.min(v, yMax) / yMax) * (area.bottom - area.top);
    return { area, x, y };
  }

  function drawRate(canvas, now) {
    const s = surface(canvas);
    if (!s) return;
    const c = colors();
    let top = 0;
    for (let ago = 1; ago <= WINDOW; ago++) top = Math.max(top, (state.buckets.get(now - ago) || { n: 0 }).n);
    const yMax = niceCeil(top);
    const { x, y } = frameChart(s, yMax, axisNumber);
    const bar = Math.max(1, x(0) - x(1) - 0.5);
    for (let ago = 1; ago <= WINDOW; ago++) {
      const b = state.buckets.get(now - ago);
      if (!b || !b.n) continue;
      const left = x(ago);
      s.ctx.fillStyle = c.accent;
      s.ctx.fillRect(left, y(b.n - b.err), bar, y(0) - y(b.n - b.err));
      if (b.err) {
        s.ctx.fillStyle = c.err;
        s.ctx.fillRect(left, y(b.n), bar, y(b.n - b.err) - y(b.n));
      }
    }
  }

  function drawLine(ctx, points, color, width) {
    ctx.strokeStyle = color;
    ctx.lineWidth = width;
    ctx.lineJoin = "round";
    ctx.beginPath();
    let open = false;
    for (const p of points) {
      if (p === null) {
        open = false;
        continue;
      }
      if (open) ctx.lineTo(p[0], p[1]);
      else ctx.moveTo(p[0], p[1]);
      open = true;
    }
    ctx.stroke();
  }

  function drawLatency(canvas, now) {
    const s = surface(canvas);
    if (!s) return;
    const c = colors();
    let top = 0;
    for (let ago = 1; ago <= WINDOW; ago++) {
      const b = state.buckets.get(now - ago);
      if (b && b.ok) top = Math.max(top, b.max);
    }
    const yMax = niceCeil(top);
    const { x, y } = frameChart(s, yMax, (v) => (v >= 1000 ? `${axisNumber(v / 1000)}s` : axisNumber(v)));
    const mean = [];
    const max = [];
    for (let ago = WINDOW; ago >= 1; ago--) {
      const b = state.buckets.get(now - ago);
      if (!b || !b.ok) {
        mean.push(null);
        max.push(null);
        continue;
      }
      mean.push([x(ago - 0.5), y(b.sum / b.ok)]);
      max.push([x(ago - 0.5), y(b.max)]);
    }
    drawLine(s.ctx, max, c.max, 1);
    drawLine(s.ctx, mean, c.accent, 2);
    // a lone point is not a line: mark each sample too when they are sparse
    s.ctx.fillStyle = c.accent;
    for (const p of mean) if (p) s.ctx.fillRect(p[0] - 1.5, p[1] - 1.5, 3, 3);
  }

  function drawLoad(canvas, now) {
    const s = surface(canvas);
    if (!s) return;
    const c = colors();
    const samples = state.load.filter((p) => now - p.t <= WINDOW);
    let top = 0;
    for (const p of samples) top = Math.max(top, p.inFlight, p.queue);
    const yMax = niceCeil(Math.max(top, 1));
    const { x, y } = frameChart(s, yMax, axisNumber);
    const steps = (key) => {
      const points = [];
      samples.forEach((p, i) => {
        const ago = Math.max(0, now - p.t);
        if (i > 0) points.push([x(ago), y(samples[i - 1][key])]);
        points.push([x(ago), y(p[key])]);
      });
      return points;
    };
    drawLine(s.ctx, steps("queue"), c.queue, 1.5);
    drawLine(s.ctx, steps("inFlight"), c.accent, 2);
  }

  function renderCharts() {
    const now = Math.floor(serverNow());
    drawRate($("chart-rate"), now);
    drawLatency($("chart-latency"), now);
    drawLoad($("chart-load"), serverNow());
  }

  // ---- the connection: WebSocket first, polling while it is down -------------------------

  const conn = { ws: null, attempt: 0, retry: 0, poll: 0, polling: false, live: false, last: 0 };

  function setConn(mode, text) {
    const node = $("conn");
    node.dataset.state = mode;
    setText("conn", text);
  }

  function setLive(live) {
    conn.live = live;
    if (live) {
      stopPolling();
      setConn("live", "live");
    }
  }

  function connect() {
    clearTimeout(conn.retry);
    conn.retry = 0;
    if (!("WebSocket" in window)) {
      startPolling();
      return;
    }
    const url = new URL("ws", document.baseURI);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    let ws;
    try {
      ws = new WebSocket(url.href);
    } catch (err) {
      socketDown();
      return;
    }
    conn.ws = ws;
    ws.onmessage = (event) => {
      if (conn.ws !== ws) return;
      conn.last = Date.now();
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch (err) {
        return;
      }
      handle(msg);
    };
    ws.onclose = () => {
      if (conn.ws === ws) socketDown();
    };
  }

  // The socket closed, failed to open, or went silent: poll meanwhile and retry with backoff.
  function socketDown() {
    const ws = conn.ws;
    conn.ws = null;
    if (ws) {
      ws.onclose = null;
      ws.onmessage = null;
      if (ws.readyState <= 1) ws.close();
    }
    conn.live = false;
    setConn("polling", "polling");
    startPolling();
    const base = Math.min(BACKOFF_MAX, BACKOFF_MIN * 2 ** conn.attempt);
    conn.attempt += 1;
    clearTimeout(conn.retry);
    conn.retry = setTimeout(connect, base / 2 + (Math.random() * base) / 2);
  }

  async function getJSON(path) {
    const resp = await fetch(path, { cache: "no-store", headers: { Accept: "application/json" } });
    if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
    return resp.json();
  }

  async function poll() {
    if (conn.polling || conn.live) return;
    conn.polling = true;
    try {
      const [stats, backends, history, models] = await Promise.all([
        getJSON("v1/stats"),
        getJSON("v1/backends"),
        getJSON("v1/history"), // a limit past [history] max_entries would be a 400
        getJSON("v1/models"),
      ]);
      if (conn.live) return; // the socket came back meanwhile: it is ahead of this answer
      applyStats(stats);
      applyBackends(backends.data);
      applyModels(models.data);
      for (const o of (history.data || []).slice(-200)) addRequest(o, true);
      setConn("polling", "polling");
    } catch (err) {
      if (!conn.live) setConn("offline", "offline, retrying");
    } finally {
      conn.polling = false;
    }
  }

  function startPolling() {
    if (conn.poll) return;
    conn.poll = setInterval(poll, POLL_MS);
    poll();
  }

  function stopPolling() {
    clearInterval(conn.poll);
    conn.poll = 0;
  }

  // ---- start -------------------------------------------------------------------------------

  setInterval(() => {
    if (conn.live && Date.now() - conn.last > STALE_MS) socketDown();
    prune();
    dirty("charts", "summary");
  }, 1000);

  const scheme = window.matchMedia("(prefers-color-scheme: dark)");
  const repaint = () => {
    palette = null;
    dirty("charts");
  };
  if (scheme.addEventListener) scheme.addEventListener("change", repaint);
  if (window.ResizeObserver) new ResizeObserver(repaint).observe(document.querySelector(".charts"));
  else window.addEventListener("resize", repaint);

  connect();
})();
