// The customer usage and billing page: money first (invoice preview, budget, grants, issued
// invoices), then usage by model and workflow and over time; charts drawn as plain SVG.
// No build step, no third-party code. The token comes from the URL fragment (#token=...),
// which browsers never send to a server, and is kept in this tab's sessionStorage only.
"use strict";

const TOKEN_KEY = "meterstream.token";
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

// -- exact decimals ------------------------------------------------------------------------
// The API sends credits and money as exact decimal strings; round them half-up for display
// with BigInt so no binary float ever changes a figure the customer is billed on.
function roundDecimal(text, places) {
  let negative = text.startsWith("-");
  const [intPart, fracPart = ""] = (negative ? text.slice(1) : text).split(".");
  let digits;
  if (fracPart.length <= places) {
    digits = BigInt(intPart + fracPart.padEnd(places, "0"));
  } else {
    digits = BigInt(intPart + fracPart.slice(0, places));
    if (Number(fracPart[places]) >= 5) digits += 1n;
  }
  if (digits === 0n) negative = false;
  const raw = digits.toString().padStart(places + 1, "0");
  const whole = raw.slice(0, raw.length - places);
  const frac = places ? raw.slice(raw.length - places) : "";
  return { negative, whole, frac };
}

function formatDecimal(text, places = 2) {
  const { negative, whole, frac } = roundDecimal(String(text), places);
  const grouped = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return (negative ? "-" : "") + grouped + (places ? "." + frac : "");
}

const credits = (text) => formatDecimal(text, 2);
const dollars = (text) => (String(text).startsWith("-") ? "-$" + formatDecimal(String(text).slice(1), 2) : "$" + formatDecimal(text, 2));
const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

// "2026-12-01T20:52:40Z" -> "1 Dec 2026, 20:52 UTC": times are read, not parsed, by customers.
function readableTime(iso) {
  const m = /^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2}))?/.exec(iso || "");
  if (!m) return iso || "";
  const day = `${Number(m[3])} ${MONTHS[Number(m[2]) - 1]} ${m[1]}`;
  return m[4] === undefined ? day : `${day}, ${m[4]}:${m[5]} UTC`;
}

function monthName(period) {
  const [year, month] = period.split("-");
  return `${MONTHS[Number(month) - 1]} ${year}`;
}

function cellRow(values, numeric = []) {
  const row = document.createElement("tr");
  values.forEach((value, i) => {
    const cell = document.createElement("td");
    if (numeric.includes(i)) cell.className = "num";
    if (value instanceof Node) cell.append(value); else cell.textContent = value;
    row.append(cell);
  });
  return row;
}

function exact(text, shown) {
  const span = document.createElement("span");
  span.textContent = shown;
  span.dataset.exact = text;
  span.title = "exact: " + text;
  return span;
}

function setFigure(id, text, exact) {
  const el = $(id);
  el.textContent = text;
  if (exact !== undefined) {
    el.dataset.exact = exact;
    el.title = "exact: " + exact;
  }
}

// -- the API -------------------------------------------------------------------------------
class Unauthorized extends Error {}
class Forbidden extends Error {}

function currentToken() {
  const match = /(?:^|&)token=([^&]+)/.exec(location.hash.slice(1));
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    // Keep the token out of the address bar, history and screenshots.
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

async function api(path, token) {
  const response = await fetch(path, { headers: { Authorization: "Bearer " + token }, cache: "no-store" });
  if (response.status === 401) throw new Unauthorized("This token is not valid.");
  const body = await response.json().catch(() => ({}));
  if (response.status === 403) throw new Forbidden(body.error || "Not allowed for this token.");
  if (!response.ok) throw new Error(body.error || "The server answered " + response.status + ".");
  return body;
}

// -- SVG helpers ---------------------------------------------------------------------------
function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

// The axis top: four equal steps, each a round multiple of a power of ten.
function niceMax(value) {
  if (!(value > 0)) return 4;
  const rough = value / 4;
  const magnitude = Math.pow(10, Math.floor(Math.log10(rough)));
  const step = [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10].map((m) => m * magnitude).find((s) => s >= rough);
  return step * 4;
}

function axisLabel(value) {
  if (value >= 1e6) return (value / 1e6).toFixed(value % 1e6 ? 1 : 0) + "M";
  if (value >= 1e3) return (value / 1e3).toFixed(value % 1e3 ? 1 : 0) + "k";
  return String(Number(value.toFixed(2)));
}

function frame(svg, width, height, margin, yMax) {
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const plotH = height - margin.top - margin.bottom;
  const y = (v) => margin.top + plotH - (v / yMax) * plotH;
  for (let i = 0; i <= 4; i++) {
    const v = (yMax * i) / 4;
    svg.append(el("line", { x1: margin.left, x2: width - margin.right, y1: y(v), y2: y(v), class: "grid" }));
    svg.append(el("text", { x: margin.left - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, axisLabel(v)));
  }
  return y;
}

// -- usage over time -----------------------------------------------------------------------
function drawUsage(view) {
  const svg = $("usage-chart");
  const width = 1180, height = 210, margin = { top: 12, right: 12, bottom: 34, left: 56 };
  const usage = view.series.map((p) => Number(p.usage_credits));
  const outcome = view.series.map((p) => Number(p.outcome_credits));
  const y = frame(svg, width, height, margin, niceMax(Math.max(...usage.map((u, i) => u + outcome[i]), 0)));
  const slot = (width - margin.left - margin.right) / view.series.length;
  const labelEvery = Math.max(1, Math.ceil(view.series.length / 14));
  view.series.forEach((point, i) => {
    const x = margin.left + i * slot;
    const total = usage[i] + outcome[i];
    const bar = el("rect", {
      x: x + slot * 0.12, width: Math.max(slot * 0.76, 1),
      y: y(usage[i]), height: Math.max(y(0) - y(usage[i]), total > 0 ? 1 : 0), class: "bar",
    });
    const when = view.bucket === "hour" ? readableTime(point.start) : readableTime(point.start.slice(0, 10));
    let tip = `${when}: ${point.usage_credits} usage credits, ${point.outcome_credits} outcome credits, ${point.events} events`;
    if (point.cost_to_serve !== undefined) tip += `, cost to serve $${point.cost_to_serve}`;
    bar.append(el("title", {}, tip));
    svg.append(bar);
    if (outcome[i] > 0) {
      const top = el("rect", { x: x + slot * 0.12, width: Math.max(slot * 0.76, 1), y: y(total),
        height: y(usage[i]) - y(total), class: "bar outcome" });
      top.append(el("title", {}, tip));
      svg.append(top);
    }
    if (i % labelEvery === 0) {
      const label = view.bucket === "hour" ? point.start.slice(5, 13).replace("T", " ") + "h" : point.start.slice(5, 10);
      svg.append(el("text", { x: x + slot / 2, y: height - 12, class: "tick", "text-anchor": "middle" }, label));
    }
  });
}

function renderUsage(view) {
  setFigure("usage-credits", credits(view.totals.usage_credits), view.totals.usage_credits);
  setFigure("outcome-credits", credits(view.totals.outcome_credits), view.totals.outcome_credits);
  setFigure("usage-events", view.totals.events.toLocaleString("en-US"));
  if (view.totals.cost_to_serve !== undefined) {
    setFigure("usage-cost", dollars(view.totals.cost_to_serve), view.totals.cost_to_serve);
  } else {
    $("usage-cost-figure").hidden = true;
  }
  drawUsage(view);
}

// -- money: the invoice preview, grants, issued invoices ---------------------------------------
function renderInvoice(invoice, previous) {
  setFigure("invoice-total", dollars(invoice.total), invoice.total);
  $("invoice-title").textContent = invoice.status === "preview" ? "Invoice preview (month not closed)" : "Invoice";
  setFigure("billed-credits", credits(invoice.usage.billed_overage_credits), invoice.usage.billed_overage_credits);
  if (previous) setFigure("previous-total", dollars(previous.total) + ` (${monthName(previous.period)})`, previous.total);
  else setFigure("previous-total", "\u2013");
  $("invoice-plan").textContent = `Plan ${invoice.plan_id}, version ${invoice.plan_version}; ` +
    `${credits(invoice.usage.credits_used)} usage credits used of ${credits(invoice.usage.included_credits)} included.`;
  $("invoice-lines").tBodies[0].replaceChildren(...invoice.lines.map((line) => cellRow([
    line.description,
    line.quantity === null ? "" : formatDecimal(line.quantity, line.quantity.includes(".") ? 2 : 0),
    line.unit_price === null ? "" : "$" + line.unit_price,
    exact(line.amount, dollars(line.amount)),
  ], [1, 2, 3])));
  setFigure("invoice-lines-total", dollars(invoice.total), invoice.total);
  const grants = invoice.grants;
  $("grants").tBodies[0].replaceChildren(...grants.map((g) => cellRow([
    g.grant_id, g.kind, g.expires ? readableTime(g.expires) : "never",
    exact(g.opening_credits, credits(g.opening_credits)), exact(g.drawn_credits, credits(g.drawn_credits)),
    exact(g.closing_credits, credits(g.closing_credits)),
  ], [3, 4, 5])));
  if (!grants.length) $("grants-note").textContent = "No credit grants or prepaid credits on this account.";
}

function renderIssued(view) {
  const body = $("issued").tBodies[0];
  if (!view.invoices.length) {
    body.replaceChildren(cellRow(["No closed billing periods yet.", "", "", ""]));
    return;
  }
  body.replaceChildren(...view.invoices.map((inv) => cellRow([
    monthName(inv.period), `${inv.plan_id} (${inv.plan_version})`, inv.status, exact(inv.total, dollars(inv.total)),
  ], [3])));
}

// -- usage by model and workflow, this month against last --------------------------------------
function renderBreakdown(view) {
  for (const [id, rows] of [["by-model", view.by_model], ["by-workflow", view.by_workflow]]) {
    $(id).tBodies[0].replaceChildren(...rows.map((r) => {
      const now = Number(r.this_period.usage_credits), before = Number(r.last_period.usage_credits);
      const change = document.createElement("span");
      if (before > 0) {
        const pct = ((now - before) / before) * 100;
        change.textContent = (pct >= 0 ? "+" : "") + pct.toFixed(0) + "%";
        change.className = pct > 0 ? "up" : pct < 0 ? "down" : "";
      } else change.textContent = now > 0 ? "new" : "\u2013";
      return cellRow([
        r.name, exact(r.this_period.usage_credits, credits(r.this_period.usage_credits)),
        exact(r.last_period.usage_credits, credits(r.last_period.usage_credits)), change,
        exact(r.this_period.outcome_credits, credits(r.this_period.outcome_credits)),
        r.this_period.events.toLocaleString("en-US"),
      ], [1, 2, 3, 4, 5]);
    }));
  }
}

// -- budget burn-down ----------------------------------------------------------------------
function drawBurnDown(view) {
  const svg = $("burn-chart");
  const width = 560, height = 200, margin = { top: 14, right: 44, bottom: 28, left: 56 };
  const daysInMonth = Math.round((Date.parse(view.period_end) - Date.parse(view.period_start)) / 86400000);
  const budget = view.budget ? Number(view.budget.monthly_credits) : 0;
  const projected = view.projection ? Number(view.projection.month_end_budget_credits) : 0;
  const cumulative = view.days.map((d) => Number(d.cumulative_budget_credits));
  const yMax = niceMax(Math.max(budget * 1.1, projected, ...cumulative, 0));
  const y = frame(svg, width, height, margin, yMax);
  const plotW = width - margin.left - margin.right;
  const x = (day) => margin.left + (day / daysInMonth) * plotW; // day = days since the period start

  let lastLabel = Infinity;
  for (const threshold of [...view.thresholds].sort((a, b) => b.percent - a.percent)) {
    const value = Number(threshold.budget_credits);
    const cls = threshold.percent >= 100 ? "budget-line" : "threshold-line";
    svg.append(el("line", { x1: margin.left, x2: width - margin.right, y1: y(value), y2: y(value), class: cls }));
    // Labels of close thresholds would overlap: a label needs 13px below the one above it.
    if (y(value) - (lastLabel === Infinity ? -Infinity : lastLabel) >= 13) {
      svg.append(el("text", { x: width - margin.right + 4, y: y(value) + 4, class: "tick" }, threshold.percent + "%"));
      lastLabel = y(value);
    }
  }
  for (const day of [1, 8, 15, 22, daysInMonth]) {
    svg.append(el("text", { x: x(day - 0.5), y: height - 8, class: "tick", "text-anchor": "middle" }, String(day)));
  }
  const asOf = (Date.parse(view.as_of) - Date.parse(view.period_start)) / 86400000;
  const points = [[x(0), y(0)]];
  view.days.forEach((d, i) => points.push([x(Math.min(i + 1, asOf)), y(cumulative[i])]));
  svg.append(el("polyline", { points: points.map((p) => p.join(",")).join(" "), class: "spend" }));
  const last = points[points.length - 1];
  if (view.projection) {
    svg.append(el("line", { x1: last[0], y1: last[1], x2: x(daysInMonth), y2: y(projected), class: "projection" }));
  }
  svg.append(el("circle", { cx: last[0], cy: last[1], r: 4, class: "spend-dot" }));
}

function renderBudget(view) {
  $("period").textContent = monthName(view.period);
  $("as-of").textContent = readableTime(view.as_of);
  const mtd = view.month_to_date;
  const projection = view.projection;
  const creditLine = `${credits(mtd.budget_credits)} budget credits = ${credits(mtd.usage_credits)} usage credits + ` +
    `${credits(mtd.outcome_credits)} outcome credits`;
  if (view.budget) {
    const money = view.budget.unit === "money";
    if (money) {
      setFigure("budget-spent", `${dollars(mtd.spent_amount)} of ${dollars(view.budget.monthly_amount)}`, mtd.spent_amount);
      $("budget-credits-line").textContent = `${creditLine}, of ${credits(view.budget.monthly_credits)} (the budget in credits).`;
    } else {
      setFigure("budget-spent", `${credits(mtd.budget_credits)} of ${credits(view.budget.monthly_credits)} credits`, mtd.budget_credits);
      $("budget-credits-line").textContent = creditLine + ".";
    }
    setFigure("used-percent", formatDecimal(view.used_percent, 1) + "%", view.used_percent);
    if (projection) {
      const shown = money ? dollars(projection.month_end_amount) : credits(projection.month_end_budget_credits) + " credits";
      setFigure("projection", shown, money ? projection.month_end_amount : projection.month_end_budget_credits);
    } else {
      setFigure("projection", "from day 4");
    }
    const thresholds = view.thresholds.map((t) => t.percent + "%" + (t.reached ? " (reached)" : "")).join(", ");
    let note = `Thresholds: ${thresholds}. At 100% the budget's action is ${view.budget.action}.`;
    if (view.budget_reached) note += " The budget is used up for this month.";
    else if (projection && projection.exhausted_at) note += ` At the current rate it runs out on ${readableTime(projection.exhausted_at.slice(0, 10))}.`;
    $("projection-note").textContent = note + " Projection: " + view.projection_rule;
  } else {
    setFigure("budget-spent", "no budget set");
    setFigure("used-percent", "\u2013");
    setFigure("projection", projection ? credits(projection.month_end_budget_credits) + " credits" : "from day 4");
    $("budget-credits-line").textContent = creditLine + ".";
    $("projection-note").textContent = "No monthly budget is configured for this account. Projection: " + view.projection_rule;
  }
  drawBurnDown(view);
}

// -- enforcement ---------------------------------------------------------------------------
const STATE_TEXT = {
  ok: "No budget threshold crossed this month.",
  warn: "A budget threshold was crossed; nothing is restricted.",
  downgrade: "The monthly budget is used up: requests are downgraded.",
  block: "The monthly budget is used up: requests are blocked.",
};

function renderEnforcement(view) {
  const badge = $("enforcement-state");
  badge.textContent = view.state;
  badge.className = "badge state-" + view.state;
  let detail = STATE_TEXT[view.state];
  if (view.since) detail += " Since " + readableTime(view.since) + ".";
  if (view.reason) detail += " " + view.reason + ".";
  $("enforcement-detail").textContent = detail;
  $("enforcement-note").textContent = view.derived_from === "enforcement-state"
    ? "The live decision from the enforcement-state topic: the same one your SDK guard enforces."
    : "Derived from your monthly budget alerts until the live decision arrives: warn = a budget threshold " +
      "was crossed; downgrade or block = your budget's action at 100%.";
  $("alerts").replaceChildren(...view.alerts.map((a) => {
    const item = document.createElement("li");
    item.textContent = `${a.threshold_percent}% crossed on ${readableTime(a.crossed_at)}` +
      ` (${credits(a.spent_credits)} of ${credits(a.budget_credits)} credits)` +
      (a.action !== "alert" ? ` \u2013 ${a.action}` : "");
    return item;
  }));
}

// -- the page ------------------------------------------------------------------------------
function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  document.body.dataset.state = "error";
}

function showSignIn(message) {
  $("views").hidden = true;
  $("signin").hidden = false;
  if (message) showError(message);
  else document.body.dataset.state = "signin";
}

async function loadUsage(me, token) {
  const days = $("days").value;
  const bucket = $("bucket").value;
  const base = "/api/v1/customers/" + encodeURIComponent(me.customer_id);
  renderUsage(await api(`${base}/usage?days=${days}&bucket=${bucket}`, token));
}

function fillDayChoices(me, initial) {
  const select = $("days");
  const bucket = $("bucket").value;
  const limit = bucket === "hour" ? me.max_hourly_days : me.max_days;
  const wanted = bucket === "hour" ? [1, 2, 7, 14] : [7, 14, 30, 60, 90];
  const previous = initial || Number(select.value) || (bucket === "hour" ? 2 : me.default_days);
  const choices = [...new Set([...wanted, previous].filter((d) => d <= limit))].sort((a, b) => a - b);
  select.replaceChildren(...choices.map((d) => new Option(String(d), String(d))));
  select.value = String(choices.includes(previous) ? previous : choices[choices.length - 1]);
}

async function main() {
  const token = currentToken();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
    location.reload();
  });
  if (!token) return showSignIn();
  try {
    const me = await api("/api/v1/me", token);
    $("customer").textContent = me.customer_id;
    document.title = "Usage \u2013 " + me.customer_id;
    // ?bucket=hour&days=2 picks the initial view, so a view can be bookmarked.
    const query = new URLSearchParams(location.search);
    if (query.get("bucket") === "hour") $("bucket").value = "hour";
    fillDayChoices(me, Number(query.get("days")) || 0);
    const base = "/api/v1/customers/" + encodeURIComponent(me.customer_id);
    // A token limited to some meters reads their usage only: the money cards answer 403 and stay hidden.
    const money = (path) => api(base + path, token).catch((error) => {
      if (error instanceof Forbidden) return null;
      throw error;
    });
    const [invoice, previous, issued, budget, enforcement, breakdown] = await Promise.all([
      money("/invoice?period=current"), money("/invoice?period=previous"), money("/invoices"),
      money("/budget"), money("/enforcement"), api(base + "/breakdown", token), loadUsage(me, token),
    ]);
    $("period").textContent = monthName(breakdown.period);
    $("as-of").textContent = readableTime(new Date().toISOString());
    if (invoice) renderInvoice(invoice, previous && previous.lines.length ? previous : null);
    if (issued) renderIssued(issued);
    if (budget) renderBudget(budget);
    if (enforcement) renderEnforcement(enforcement);
    renderBreakdown(breakdown);
    if (!invoice) document.querySelectorAll("[data-money]").forEach((card) => { card.hidden = true; });
    $("views").hidden = false;
    $("usage-controls").addEventListener("change", (event) => {
      if (event.target.id === "bucket") fillDayChoices(me);
      loadUsage(me, token).catch((error) => showError(error.message));
    });
    document.body.dataset.state = "ready";
  } catch (error) {
    if (error instanceof Unauthorized) {
      sessionStorage.removeItem(TOKEN_KEY);
      return showSignIn(error.message);
    }
    showError(error.message);
  }
}

document.addEventListener("DOMContentLoaded", main);
