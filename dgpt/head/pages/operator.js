// The operator's page: the fleet, its donors, sessions, endpoints, jobs, the autoscaler and
// two plots, refreshed every few seconds from /api/v1 with the API key typed at sign-in.
"use strict";

(() => {
  const { api, ApiFailure, session, every, el, byId, number, percent, duration, time, rows, badge, problem, plot, showSignedIn, refreshed, refreshFailed } = dgpt;
  const KEY = "operator.apiKey";
  const STATES = ["active", "activating", "draining", "standby", "registered", "gone"];
  const RUNNING = new Set(["active", "activating", "draining"]);
  let stop = null;

  function signOut(message) {
    if (stop) stop();
    stop = null;
    session.clear(KEY);
    showSignedIn(false);
    problem(byId("error"), message ? { message } : null);
  }

  // Sections that depend on Ray's job server or dashboard show their own error, not the page's.
  async function optional(promise, errorNode) {
    try {
      const value = await promise;
      problem(errorNode, null);
      return value;
    } catch (err) {
      if (err.status === 401 || !(err instanceof ApiFailure)) throw err;
      problem(errorNode, err);
      return null;
    }
  }

  async function load() {
    const key = session.get(KEY);
    try {
      const [cluster, donors, credit, sessions, fleet, creditHistory] = await Promise.all([
        api("cluster", key), api("donors?limit=500", key), api("credit", key), api("sessions?limit=30", key),
        api("cluster/history", key), api("credit/history?window_s=86400&points=96", key),
      ]);
      const [endpoints, jobs] = await Promise.all([
        optional(api("endpoints", key), byId("endpoints-error")), optional(api("jobs", key), byId("jobs-error")),
      ]);
      render({ cluster, donors, credit, sessions, fleet, creditHistory, endpoints, jobs });
      refreshed();
    } catch (err) {
      refreshFailed(err, signOut);
    }
  }

  function render(data) {
    const { cluster, donors, credit, sessions, fleet, creditHistory, endpoints, jobs } = data;
    const names = Object.fromEntries(donors.map((d) => [d.donor_id, d.name]));
    const creditOf = Object.fromEntries(credit.map((c) => [c.donor_id, c]));

    // Fleet by state.
    const counts = cluster.donors_by_state;
    byId("fleet-states").replaceChildren(...STATES.map((state) =>
      el("div", { class: `stat ${state}`, "data-state": state },
        el("span", { class: "n", text: String(counts[state] || 0) }), el("span", { text: state }))));
    const total = cluster.resources_total;
    const free = cluster.resources_available;
    byId("resources").textContent = `Ray: ${number(total.CPU || 0)} CPUs (${number(free.CPU || 0)} free), ` +
      `${number((total.memory || 0) / 2 ** 30, 1)} GiB memory, ${number(total.GPU || 0)} GPUs; ` +
      `${cluster.active_donors} active and ${cluster.standby_donors} standby donors`;
    const rogue = cluster.rogue_nodes || [];
    byId("rogue").hidden = !rogue.length;
    rows(byId("rogue-rows"), rogue, (r) => [r.node_id.slice(0, 12), r.address, r.reason, time(r.since),
      r.drain_requested ? "yes" : "not yet"], "none");

    // Donors.
    const now = Date.now() / 1000;
    const openSince = (d) => {
      const open = (d.sessions || []).find((s) => s.ended_at === null || s.ended_at === undefined);
      return open ? now - open.started_at : null;
    };
    const running = donors.filter((d) => RUNNING.has(d.state));
    const others = donors.filter((d) => !RUNNING.has(d.state));
    rows(byId("active-donors").tBodies[0], running, (d) => {
      const c = creditOf[d.donor_id];
      return [d.name, d.donor_id, badge(d.state), d.device_class, d.owner, number(d.reliability, 3), percent(d.load),
        number(d.resources.CPU), duration(openSince(d)),
        c ? `${number(c.total_credit)} (${number(c.recent_average_credit)})` : "0"];
    }, "no donor is active");
    byId("donor-count").textContent = donors.length >= 500 ? "the first 500 donors (dgpt donor list pages further)" :
      `${donors.length} donor(s) in all, ${others.length} not running`;
    rows(byId("other-donors").tBodies[0], others, (d) => [d.name, d.donor_id,
      d.paused ? badge(`paused (${d.paused_by})`, "paused") : badge(d.state), d.device_class, d.owner,
      number(d.reliability, 3), `${d.sessions_total} (${d.sessions_lost})`,
      d.last_heartbeat_at ? `${duration(now - d.last_heartbeat_at)} ago` : "-",
      d.problem || (d.owner_active ? "its owner is using it" : "")], "none");

    // Sessions ended.
    rows(byId("sessions").tBodies[0], sessions, (s) => [time(s.ended_at), s.donor_name, badge(s.ended_as),
      s.end_reason || "", duration(s.ended_at - s.started_at)], "no session has ended yet");

    // Endpoints and jobs (null: the section shows why it could not load).
    if (endpoints) {
      rows(byId("endpoints").tBodies[0], endpoints, (e) => [e.app, e.route_prefix || "-", badge(e.status.toLowerCase(), "status"),
        Object.entries(e.replicas).map(([donor, n]) => `${names[donor] || donor}: ${n}`).join(", ") || "none running"],
      "no endpoint is deployed (dgpt serve deploy deployments/digits.yaml)");
    }
    if (jobs) {
      const latest = [...jobs].sort((a, b) => (b.start_time || 0) - (a.start_time || 0)).slice(0, 20);
      rows(byId("jobs").tBodies[0], latest, (j) => [j.job_id, badge(j.status.toLowerCase(), "status"), j.entrypoint,
        time(j.start_time), time(j.end_time)], "no job submitted yet");
    }

    // The autoscaler.
    const auto = cluster.autoscaler || {};
    const tick = auto.last_tick || {};
    const bounds = auto.bounds || {};
    byId("autoscaler-summary").textContent = auto.error ? auto.error :
      `${auto.ticks || 0} ticks, ${auto.errors || 0} errors; min/max active ${bounds.min_active ?? "-"}/` +
      `${bounds.max_active ?? "-"}; last tick: ${tick.active || 0} active, ${tick.activating || 0} activating, ` +
      `${tick.standby || 0} standby, ${tick.pending || 0} pending shapes`;
    const decisions = [...(auto.recent || [])].reverse().slice(0, 20);
    rows(byId("decisions").tBodies[0], decisions, (a) => [time(a.at), a.action, names[a.donor_id] || a.donor_id,
      a.reason, `${a.ok ? "ok" : "refused"}: ${a.result}`], "no decision yet");

    // Plots: the donors online (all but gone) and active, and the fleet's credit.
    const samples = fleet.points.map((p) => [p.at, p.donors_by_state]);
    const online = (c) => Object.entries(c).filter(([s]) => s !== "gone").reduce((n, [, v]) => n + v, 0);
    plot(byId("fleet-plot"), [
      { name: "online", kind: "online", step: true, points: samples.map(([t, c]) => [t, online(c)]) },
      { name: "active", kind: "active", step: true, points: samples.map(([t, c]) => [t, c.active || 0]) },
    ], { digits: 0, minMax: 1 });
    plot(byId("credit-plot"), [
      { name: "credit", kind: "credit", points: creditHistory.points.map((p) => [p.end_at, p.total_credit]) },
    ], { digits: 2 });
  }

  document.addEventListener("DOMContentLoaded", () => {
    byId("sign-in").addEventListener("submit", (event) => {
      event.preventDefault();
      session.set(KEY, byId("api-key").value.trim());
      byId("api-key").value = "";
      showSignedIn(true);
      if (stop) stop();
      stop = every(load);
    });
    byId("sign-out").addEventListener("click", () => signOut(null));
    if (session.get(KEY)) {
      showSignedIn(true);
      stop = every(load);
    } else {
      showSignedIn(false);
    }
  });
})();
