// The customer usage page: three views from the JSON API, charts drawn as plain SVG.
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
const dollars = (text) => "$" + formatDecimal(text, 2);

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
  const values = view.series.map((p) => Number(p.credits));
  const y = frame(svg, width, height, margin, niceMax(Math.max(...values, 0)));
  const slot = (width - margin.left - margin.right) / view.series.length;
  const labelEvery = Math.max(1, Math.ceil(view.series.length / 14));
  view.series.forEach((point, i) => {
    const x = margin.left + i * slot;
    const value = values[i];
    const bar = el("rect", {
      x: x + slot * 0.12, width: Math.max(slot * 0.76, 1),
      y: y(value), height: Math.max(y(0) - y(value), value > 0 ? 1 : 0), class: "bar",
    });
    const when = view.bucket === "hour" ? point.start.slice(0, 13).replace("T", " ") + ":00" : point.start.slice(0, 10);
    let tip = `${when}: ${point.credits} credits, ${point.events} events`;
    if (point.cost_to_serve !== undefined) tip += `, cost to serve $${point.cost_to_serve}`;
    bar.append(el("title", {}, tip));
    svg.append(bar);
    if (i % labelEvery === 0) {
      const label = view.bucket === "hour" ? point.start.slice(5, 13).replace("T", " ") + "h" : point.start.slice(5, 10);
      svg.append(el("text", { x: x + slot / 2, y: height - 12, class: "tick", "text-anchor": "middle" }, label));
    }
  });
}

function renderUsage(view) {
  setFigure("usage-credits", credits(view.totals.credits), view.totals.credits);
  setFigure("usage-events", view.totals.events.toLocaleString("en-US"));
  if (view.totals.cost_to_serve !== undefined) {
    setFigure("usage-cost", dollars(view.totals.cost_to_serve), view.totals.cost_to_serve);
  } else {
    $("usage-cost-figure").hidden = true;
  }
  drawUsage(view);
}

// -- budget burn-down ----------------------------------------------------------------------
function drawBurnDown(view) {
  const svg = $("burn-chart");
  const width = 560, height = 200, margin = { top: 14, right: 44, bottom: 28, left: 56 };
  const daysInMonth = Math.round((Date.parse(view.period_end) - Date.parse(view.period_start)) / 86400000);
  const budget = view.budget ? Number(view.budget.monthly_credits) : 0;
  const projected = Number(view.projection.month_end_credits);
  const cumulative = view.days.map((d) => Number(d.cumulative_credits));
  const yMax = niceMax(Math.max(budget * 1.1, projected, ...cumulative, 0));
  const y = frame(svg, width, height, margin, yMax);
  const plotW = width - margin.left - margin.right;
  const x = (day) => margin.left + (day / daysInMonth) * plotW; // day = days since the period start

  for (const threshold of view.thresholds) {
    const value = Number(threshold.credits);
    const cls = threshold.percent >= 100 ? "budget-line" : "threshold-line";
    svg.append(el("line", { x1: margin.left, x2: width - margin.right, y1: y(value), y2: y(value), class: cls }));
    svg.append(el("text", { x: width - margin.right + 4, y: y(value) + 4, class: "tick" }, threshold.percent + "%"));
  }
  for (const day of [1, 8, 15, 22, daysInMonth]) {
    svg.append(el("text", { x: x(day - 0.5), y: height - 8, class: "tick", "text-anchor": "middle" }, String(day)));
  }
  // Spend at the end of each day so far (the last point is now).
  const asOf = (Date.parse(view.as_of) - Date.parse(view.period_start)) / 86400000;
  const points = [[x(0), y(0)]];
  view.days.forEach((d, i) => points.push([x(Math.min(i + 1, asOf)), y(cumulative[i])]));
  svg.append(el("polyline", { points: points.map((p) => p.join(",")).join(" "), class: "spend" }));
  const last = points[points.length - 1];
  svg.append(el("line", { x1: last[0], y1: last[1], x2: x(daysInMonth), y2: y(projected), class: "projection" }));
  svg.append(el("circle", { cx: last[0], cy: last[1], r: 4, class: "spend-dot" }));
}

function renderBudget(view) {
  $("period").textContent = view.period;
  $("as-of").textContent = view.as_of.replace("T", " ").replace("Z", "");
  setFigure("mtd-credits", credits(view.month_to_date.credits), view.month_to_date.credits);
  const projection = view.projection;
  if (view.budget) {
    setFigure("budget-credits", credits(view.budget.monthly_credits), view.budget.monthly_credits);
    setFigure("used-percent", formatDecimal(view.used_percent, 1) + "%", view.used_percent);
    setFigure("projection", credits(projection.month_end_credits) + " (" + formatDecimal(projection.month_end_percent, 0) + "%)",
      projection.month_end_credits);
    const thresholds = view.thresholds.map((t) => t.percent + "%" + (t.reached ? " (reached)" : "")).join(", ");
    let note = `Thresholds: ${thresholds}. At 100% the budget's action is ${view.budget.action}.`;
    if (projection.budget_reached) note += " The budget is used up for this month.";
    else if (projection.exhausted_at) note += ` At the current rate it runs out on ${projection.exhausted_at.slice(0, 10)}.`;
    $("projection-note").textContent = note + " Projection: month-to-date spend spread evenly over the month so far.";
  } else {
    setFigure("budget-credits", "no budget set");
    setFigure("used-percent", "\u2013");
    setFigure("projection", credits(projection.month_end_credits), projection.month_end_credits);
    $("projection-note").textContent = "No monthly budget is configured for this account.";
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
  if (view.since) detail += " Since " + view.since.replace("T", " ").replace("Z", " UTC") + ".";
  if (view.reason) detail += " " + view.reason + ".";
  $("enforcement-detail").textContent = detail;
  $("enforcement-note").textContent = view.derived_from === "enforcement-state"
    ? "The live decision from the enforcement-state topic: the same one your SDK guard enforces."
    : "Derived from your monthly budget alerts until the live decision arrives: warn = a budget threshold " +
      "was crossed; downgrade or block = your budget's action at 100%.";
  $("alerts").replaceChildren(...view.alerts.map((a) => {
    const item = document.createElement("li");
    item.textContent = `${a.threshold_percent}% crossed at ${a.crossed_at.slice(0, 16).replace("T", " ")}` +
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
    const [budget, enforcement] = await Promise.all([
      api(base + "/budget", token), api(base + "/enforcement", token), loadUsage(me, token),
    ]);
    renderBudget(budget);
    renderEnforcement(enforcement);
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
