// What the operator's and the donor's pages share: the API client, the sign-in kept in
// sessionStorage, the refresh loop, formatting, tables and the SVG plots.
// Plain JavaScript, no library: the head may have no internet, and the pages load only
// what it serves. Data is always written with textContent, never parsed as HTML.
"use strict";

const dgpt = (() => {
  // Relative to the page (/pages/...), so a head behind a path prefix still works.
  const API = new URL("../api/v1/", window.location.href);
  const REFRESH_MS = 3000;
  const SVG_NS = "http://www.w3.org/2000/svg";

  class ApiFailure extends Error {
    constructor(status, message, hint) {
      super(message);
      this.status = status;
      this.hint = hint || "";
    }
  }

  /** One call of the REST API; resolves to the parsed JSON, rejects with an ApiFailure. */
  async function api(path, credential, options = {}) {
    const headers = { Accept: "application/json" };
    if (credential) headers.Authorization = `Bearer ${credential}`;
    let response;
    try {
      response = await fetch(new URL(path, API), { method: options.method || "GET", headers, cache: "no-store" });
    } catch (err) {
      throw new ApiFailure(0, `the head does not answer (${err.message})`, "is the head running?");
    }
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const message = body && body.message ? body.message : `HTTP ${response.status}`;
      throw new ApiFailure(response.status, message, body && body.hint);
    }
    return body;
  }

  /** A value kept for this browser tab only (sessionStorage): gone when the tab closes. */
  const session = {
    get: (key) => window.sessionStorage.getItem(`dgpt.${key}`),
    set: (key, value) => window.sessionStorage.setItem(`dgpt.${key}`, value),
    clear: (...keys) => keys.forEach((key) => window.sessionStorage.removeItem(`dgpt.${key}`)),
  };

  /** Call ``load`` now and every REFRESH_MS, never two at once; returns a stop function. */
  function every(load) {
    let timer = null;
    let stopped = false;
    async function tick() {
      try {
        await load();
      } finally {
        if (!stopped) timer = window.setTimeout(tick, REFRESH_MS);
      }
    }
    tick();
    return () => {
      stopped = true;
      if (timer !== null) window.clearTimeout(timer);
    };
  }

  // ------------------------------------------------------------ formatting

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "text") node.textContent = value;
      else if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  function byId(id) {
    return document.getElementById(id);
  }

  function number(value, digits = 2) {
    if (value === null || value === undefined) return "-";
    return Number(value).toLocaleString(undefined, { maximumFractionDigits: digits });
  }

  function percent(value) {
    return value === null || value === undefined ? "-" : `${Math.round(value * 100)}%`;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  function time(epochSeconds) {
    if (!epochSeconds) return "-";
    const d = new Date(epochSeconds * 1000);
    const today = new Date().toDateString() === d.toDateString();
    return today ? d.toLocaleTimeString() : d.toLocaleString();
  }

  /** Fill ``tbody`` with one row per item; ``cells(item)`` gives the row's texts (or nodes). */
  function rows(tbody, items, cells, empty) {
    const columns = tbody.closest("table").querySelectorAll("thead th").length || 1;
    const out = items.map((item) => {
      const tr = el("tr");
      for (const cell of cells(item)) tr.append(cell instanceof Node ? el("td", {}, cell) : el("td", { text: String(cell) }));
      return tr;
    });
    if (!out.length) out.push(el("tr", {}, el("td", { colspan: columns, class: "empty", text: empty })));
    tbody.replaceChildren(...out);
  }

  function badge(text, kind) {
    return el("span", { class: `badge ${kind || text}`, text });
  }

  /** Show an error (an ApiFailure or another) in ``node``, or clear it with null. */
  function problem(node, err) {
    if (!err) {
      node.hidden = true;
      node.textContent = "";
      return;
    }
    node.hidden = false;
    node.textContent = err.hint ? `${err.message} (${err.hint})` : err.message;
  }

  // ------------------------------------------------------------ plots

  function svg(tag, attrs = {}) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
    return node;
  }

  /**
   * Draw time series into ``target`` (an <svg>) as lines, with axes and a legend.
   *
   * series: [{name, points: [[epochSeconds, value], ...], kind, step}] where ``step`` draws a
   * value that holds until the next point (counts), else a straight line (totals). The svg's
   * ``data-points`` says how many points were drawn (0: "no data yet").
   */
  function plot(target, series, options = {}) {
    const width = 640;
    const height = 220;
    // The legend sits above the plot area, so a line at the top value never hides it.
    const pad = { left: 56, right: 12, top: 28, bottom: 28 };
    target.setAttribute("viewBox", `0 0 ${width} ${height}`);
    target.replaceChildren();
    const all = series.flatMap((s) => s.points);
    target.dataset.points = String(all.length);
    if (!all.length) {
      target.append(Object.assign(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "axis" }),
        { textContent: options.empty || "no data yet" }));
      return;
    }
    const t0 = Math.min(...all.map((p) => p[0]));
    const t1 = Math.max(...all.map((p) => p[0]), t0 + 1);
    const vmax = Math.max(...all.map((p) => p[1]), options.minMax || 0) || 1;
    const x = (t) => pad.left + ((t - t0) / (t1 - t0)) * (width - pad.left - pad.right);
    const y = (v) => height - pad.bottom - (v / vmax) * (height - pad.top - pad.bottom);
    // Axes, the top value and the two ends of the time range.
    target.append(svg("line", { x1: pad.left, y1: y(0), x2: width - pad.right, y2: y(0), class: "axis-line" }));
    target.append(svg("line", { x1: pad.left, y1: pad.top, x2: pad.left, y2: y(0), class: "axis-line" }));
    const label = (text, attrs) => Object.assign(svg("text", { class: "axis", ...attrs }), { textContent: text });
    target.append(label(number(vmax, options.digits ?? 2), { x: pad.left - 6, y: pad.top + 4, "text-anchor": "end" }));
    target.append(label("0", { x: pad.left - 6, y: y(0) + 4, "text-anchor": "end" }));
    target.append(label(time(t0), { x: pad.left, y: height - 8, "text-anchor": "start" }));
    target.append(label(time(t1), { x: width - pad.right, y: height - 8, "text-anchor": "end" }));
    let legendX = pad.left + 8;
    series.forEach((s, i) => {
      const kind = s.kind || `series-${i}`;
      const coords = [];
      s.points.forEach(([t, v], j) => {
        if (s.step && j > 0) coords.push(`${x(t).toFixed(1)},${y(s.points[j - 1][1]).toFixed(1)}`);
        coords.push(`${x(t).toFixed(1)},${y(v).toFixed(1)}`);
      });
      target.append(svg("polyline", { points: coords.join(" "), class: `line ${kind}`, "data-series": s.name }));
      for (const [t, v] of s.points.slice(-1)) target.append(svg("circle", { cx: x(t), cy: y(v), r: 3, class: `dot ${kind}` }));
      target.append(svg("rect", { x: legendX, y: 6, width: 10, height: 10, class: `swatch ${kind}` }));
      const name = label(s.name, { x: legendX + 14, y: 15, class: "legend" });
      target.append(name);
      legendX += 24 + 7 * s.name.length;
    });
  }

  /** Show a page's signed-in parts, or its sign-in form (both pages lay them out alike). */
  function showSignedIn(signedIn) {
    byId("sign-in").hidden = signedIn;
    byId("intro").hidden = signedIn;
    byId("signed-in").hidden = !signedIn;
    byId("main").hidden = !signedIn;
  }

  /** A refresh went through: clear the error line and say when. */
  function refreshed() {
    problem(byId("error"), null);
    byId("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  }

  /** A refresh failed: a refused credential signs out; anything else is shown, and a bug of the
   * page (not an API answer) is thrown on, so the browser reports it too. */
  function refreshFailed(err, signOut) {
    if (err.status === 401) {
      signOut(`signed out: ${err.message}`);
      return;
    }
    problem(byId("error"), err);
    if (!(err instanceof ApiFailure)) throw err;
  }

  return { api, ApiFailure, session, every, el, byId, number, percent, duration, time, rows, badge, problem, plot,
           showSignedIn, refreshed, refreshFailed };
})();
