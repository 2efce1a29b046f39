// The donor's page: its uptime, sessions, credit (and a plot of it), its verification record
// when the head records one, and the pause/resume switch, signed in with the donor secret.
"use strict";

(() => {
  const { api, session, every, el, byId, number, duration, time, rows, badge, problem, plot, showSignedIn, refreshed, refreshFailed } = dgpt;
  const ID = "donor.id";
  const SECRET = "donor.secret";
  // Credit rows read for the plot: the latest this many (a row covers at most one credit interval).
  const ENTRIES = 1000;
  let stop = null;
  let view = null;
  let busy = false;

  function signOut(message) {
    if (stop) stop();
    stop = null;
    view = null;
    session.clear(ID, SECRET);
    showSignedIn(false);
    problem(byId("error"), message ? { message } : null);
  }

  function path(suffix) {
    return `donors/${encodeURIComponent(session.get(ID))}/${suffix}`;
  }

  async function load() {
    const secret = session.get(SECRET);
    try {
      const [donor, credit] = await Promise.all([api(path("own"), secret), api(path(`credit/own?entries=${ENTRIES}`), secret)]);
      view = donor;
      render(donor, credit);
      refreshed();
    } catch (err) {
      refreshFailed(err, signOut);
    }
  }

  /** A value of the verification record as text (its shape is the head's to choose). */
  function describe(key, value) {
    if (value === null || value === undefined) return "-";
    if (typeof value === "boolean") return value ? "yes" : "no";
    if (typeof value === "number") return /(_at|^at|time)$/.test(key) ? time(value) : number(value, 4);
    if (typeof value === "string") return value;
    if (Array.isArray(value)) {
      const shown = value.slice(-5).map((item, i) => describe(String(i), item)).join("; ");
      return `${value.length} record(s)${value.length ? `: ${value.length > 5 ? "... " : ""}${shown}` : ""}`;
    }
    return Object.entries(value).map(([k, v]) => `${k}: ${describe(k, v)}`).join(", ");
  }

  function renderVerification(record) {
    const section = byId("verification-section");
    section.hidden = record === undefined || record === null;
    if (section.hidden) return;
    const entries = Array.isArray(record) ? record.map((item, i) => [`#${i + 1}`, item])
      : typeof record === "object" ? Object.entries(record) : [["record", record]];
    rows(byId("verification").tBodies[0], entries, ([k, v]) => [k, describe(String(k), v)], "nothing verified yet");
  }

  function renderSwitch(donor) {
    const button = byId("pause-switch");
    const byOperator = donor.paused && donor.paused_by === "operator";
    button.setAttribute("aria-checked", donor.paused ? "false" : "true");
    button.classList.toggle("off", donor.paused);
    button.disabled = busy || byOperator;
    byId("pause-label").textContent = donor.paused ? "Paused" : "Donating";
    byId("pause-note").textContent = byOperator ? `paused by an operator since ${time(donor.paused_at)}; ask them to resume it`
      : donor.paused ? `paused since ${time(donor.paused_at)}: this device is kept out until you resume`
      : donor.owner_active ? "your device is in use: it donates again once it is idle"
      : "donating idle capacity; pause to drain it now and keep it out";
  }

  function render(donor, credit) {
    byId("donor-name").textContent = donor.name;
    byId("donor-summary").replaceChildren(
      badge(donor.state), ` ${donor.donor_id} - ${donor.device_class}, owner ${donor.owner}, `,
      `${number(donor.caps.cpus)} CPUs, ${number(donor.caps.memory_bytes / 2 ** 30, 1)} GiB offered; `,
      `last heartbeat ${donor.last_heartbeat_at ? time(donor.last_heartbeat_at) : "never"}`,
      donor.problem ? ` - not activated: ${donor.problem}` : "");
    renderSwitch(donor);
    byId("uptime").textContent = duration(donor.uptime_s);
    byId("sessions-total").textContent = String(donor.sessions_total);
    byId("sessions-lost").textContent = String(donor.sessions_lost);
    byId("reliability").textContent = number(donor.reliability, 3);
    byId("credit-total").textContent = number(credit.total_credit, 3);
    byId("credit-rac").textContent = number(credit.recent_average_credit, 3);
    byId("credit-note").textContent = credit.voided_credit > 0
      ? `${number(credit.voided_credit, 3)} credit taken back: results that failed verification`
      : `${number(credit.cpu_s, 0)} CPU-seconds and ${number(credit.gpu_s, 0)} GPU-seconds of work metered`;

    const sessionCredit = Object.fromEntries(credit.sessions.map((s) => [s.session_id, s.credit]));
    const now = Date.now() / 1000;
    const latest = [...donor.sessions].reverse();
    rows(byId("sessions").tBodies[0], latest, (s) => [String(s.session_id), time(s.started_at),
      s.ended_at ? time(s.ended_at) : "running", duration((s.ended_at || now) - s.started_at),
      s.ended_as ? badge(s.ended_as) : badge("open", "active"), s.end_reason || "",
      number(sessionCredit[s.session_id] || 0, 3)], "no session yet: the head activates this donor when work needs it");
    renderVerification(donor.verification);

    // Credit over time: the latest ledger rows, summed back from today's total.
    const entries = [...credit.entries].sort((a, b) => a.end_at - b.end_at);
    let total = credit.total_credit;
    const points = [[now, total]];
    for (let i = entries.length - 1; i >= 0; i -= 1) {
      points.push([entries[i].end_at, total]);
      total -= entries[i].credit;
    }
    points.push([entries.length ? entries[0].start_at : donor.registered_at, total]);
    plot(byId("donor-credit-plot"), [{ name: "credit", kind: "credit", points: points.reverse() }], { digits: 3 });
  }

  async function toggle() {
    if (!view || busy) return;
    busy = true;
    byId("pause-switch").disabled = true;
    try {
      const answer = await api(path(view.paused ? "resume" : "pause"), session.get(SECRET), { method: "POST" });
      view = { ...view, paused: answer.paused, paused_by: answer.paused_by, paused_at: answer.paused_at, state: answer.state };
      byId("pause-note").textContent = answer.message;
      problem(byId("error"), null);
    } catch (err) {
      problem(byId("error"), err);
    } finally {
      busy = false;
      renderSwitch(view);
    }
    await load();
  }

  document.addEventListener("DOMContentLoaded", () => {
    byId("sign-in").addEventListener("submit", (event) => {
      event.preventDefault();
      session.set(ID, byId("donor-id").value.trim());
      session.set(SECRET, byId("donor-secret").value.trim());
      byId("donor-secret").value = "";
      showSignedIn(true);
      if (stop) stop();
      stop = every(load);
    });
    byId("sign-out").addEventListener("click", () => signOut(null));
    byId("pause-switch").addEventListener("click", toggle);
    if (session.get(ID) && session.get(SECRET)) {
      showSignedIn(true);
      stop = every(load);
    } else {
      showSignedIn(false);
    }
  });
})();
