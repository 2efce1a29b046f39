"""Durability of the storage profiles: the calculator and a Monte Carlo simulation, side by side.

    python -m benchmarks.durability [--quick] [--out benchmarks/results/durability.json]

For each default profile (and 3x replication, and Storj's 29-of-80 for reference) under the
same churn (donors live ~30 days, are online 70% of the time in sessions of ~12 hours, are
declared gone after 24 hours of silence, and a repair takes an hour once started):

- **calculator** (:mod:`dgpt.storage.durability`): annual durability in nines, read
  availability, repairs and repair traffic per year. Its repair window is the detection
  timeout plus the transfer.
- **simulation**: a fleet of donors (each its own owner) and thousands of segments for a
  year, in one-hour steps. Pieces are placed by the live placement function
  (:func:`dgpt.storage.placement.place_pieces`), segments are picked for repair by the live
  checker (:func:`dgpt.storage.repair.needs_repair`) on the head's view (pieces on donors
  not declared gone), repairs need k pieces online and rebuild what the head sees missing;
  a donor declared gone that comes back brings its unrepaired pieces with it, as in the
  metadata service. Data is lost when fewer than k pieces remain on donors that have not
  left. Availability is the share of segment-hours with k pieces online.

Losses of the wide codes are far too rare to observe in a simulated year; the simulation
then reports the 95% upper bound (three losses' worth, the rule of three) and its value is
in checking availability, repair traffic, and the calculator where losses do occur
(replication, the small codes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dgpt.storage.codec import DEFAULT_PROFILES, Profile
from dgpt.storage.durability import DAY_S, YEAR_S, Churn, estimate, nines, replication
from dgpt.storage.placement import Candidate, place_pieces
from dgpt.storage.repair import needs_repair

RESULTS = Path(__file__).resolve().parent / "results" / "durability.json"
HOUR_S = 3600.0


@dataclass(frozen=True)
class FleetChurn:
    """Donor behaviour for the simulation (the calculator sees it through :meth:`calculator`)."""

    lifetime_s: float = 30 * DAY_S
    online: float = 0.7
    online_session_s: float = 12 * HOUR_S
    gone_after_s: float = 24 * HOUR_S
    transfer_s: float = HOUR_S

    def calculator(self) -> Churn:
        return Churn(lifetime_s=self.lifetime_s, online=self.online, repair_s=self.gone_after_s + self.transfer_s,
                     session_s=self.online_session_s)

    @property
    def offline_session_s(self) -> float:
        return self.online_session_s * (1 - self.online) / self.online


@dataclass
class SimResult:
    profile: str
    segments: int
    years: float
    losses: int
    annual_loss: float
    annual_loss_upper95: float
    nines: float
    nines_lower95: float
    availability: float
    availability_nines: float
    repairs_per_segment_year: float
    repair_traffic_per_year: float
    false_gone_per_donor_year: float


def simulate(profile: Profile, churn: FleetChurn, segments: int, donors: int, years: float = 1.0,
             seed: int = 0, dt_s: float = HOUR_S) -> SimResult:
    """Run one profile for ``years``; see the module docstring for the model."""
    rng = np.random.default_rng(seed)
    k, n = profile.k, profile.n
    steps = int(years * YEAR_S / dt_s)
    # Donor slots: the fleet keeps its size; a departed donor is replaced by a newcomer.
    cap = donors + int(donors * years * YEAR_S / churn.lifetime_s * 1.5) + 64
    departs_at = np.full(cap, np.inf)
    alive = np.zeros(cap, dtype=bool)
    online = np.zeros(cap, dtype=bool)
    offline_since = np.zeros(cap)
    gone = np.zeros(cap, dtype=bool)
    count = 0

    def join(t: float, m: int) -> None:
        nonlocal count
        ids = np.arange(count, count + m)
        count += m
        alive[ids] = True
        departs_at[ids] = t + rng.exponential(churn.lifetime_s, m)
        online[ids] = rng.random(m) < churn.online
        offline_since[ids] = t

    join(0.0, donors)
    p_off = 1 - math.exp(-dt_s / churn.online_session_s)
    p_on = 1 - math.exp(-dt_s / churn.offline_session_s)

    def candidates() -> list[Candidate]:
        usable = np.flatnonzero(alive[:count] & online[:count] & ~gone[:count])
        return [Candidate(str(d), str(d), 1 << 40, 0.9, "") for d in usable]

    pieces = np.full((segments, n), -1, dtype=np.int64)
    cands = candidates()
    for s in range(segments):
        chosen = place_pieces(cands, n, 1, seed=f"seg{s}")
        pieces[s] = [int(c.donor_id) for c in chosen]
    lost = np.zeros(segments, dtype=bool)
    repair_due = np.full(segments, np.inf)
    losses = repairs = false_gone = 0
    traffic = 0.0
    unavailable = 0
    samples = 0  # segment-steps at risk (a lost segment leaves the sample)
    for step in range(1, steps + 1):
        t = step * dt_s
        # Departures for good, replaced by newcomers.
        leaving = np.flatnonzero(alive[:count] & (departs_at[:count] <= t))
        if len(leaving):
            alive[leaving] = False
            went_off = online[leaving]
            offline_since[leaving[went_off]] = t
            online[leaving] = False
            join(t, len(leaving))
        # Sessions of the donors still here.
        here = np.flatnonzero(alive[:count])
        flip = rng.random(len(here))
        turning_off = here[online[here] & (flip < p_off)]
        turning_on = here[~online[here] & (flip < p_on)]
        online[turning_off] = False
        offline_since[turning_off] = t
        online[turning_on] = True
        came_back = turning_on[gone[turning_on]]
        gone[came_back] = False  # the registry sees it again: its unrepaired pieces count again
        # The head declares donors gone after a long silence (whether or not they left).
        silent = np.flatnonzero(~online[:count] & ~gone[:count] & (t - offline_since[:count] >= churn.gone_after_s))
        if len(silent):
            gone[silent] = True
            false_gone += int(alive[silent].sum())
        # Truth: fewer than k pieces on donors that have not left is data loss.
        live = ~lost
        on_alive = alive[pieces].sum(axis=1)
        newly_lost = live & (on_alive < k)
        if newly_lost.any():
            losses += int(newly_lost.sum())
            lost |= newly_lost
            repair_due[newly_lost] = np.inf
            live = ~lost
        readable = online[pieces].sum(axis=1)
        unavailable += int((live & (readable < k)).sum())
        samples += int(live.sum())
        # The head's view and the live checker decide what to repair.
        durable = (~gone[pieces]).sum(axis=1)
        start = live & np.isinf(repair_due) & needs_repair(durable, profile.repair_at) & (readable >= k)
        repair_due[start] = t + churn.transfer_s
        done = np.flatnonzero(live & (repair_due <= t))
        if len(done):
            cands = candidates()
            for s in done:
                repair_due[s] = np.inf
                missing = [i for i in range(n) if gone[pieces[s, i]]]
                if not missing or online[pieces[s]].sum() < k:
                    continue
                holders = {str(d) for d in pieces[s] if not gone[d]}
                chosen = place_pieces(cands, len(missing), 1, seed=f"seg{s}/{t}", taken_donors=holders,
                                      taken_owners=holders, minimum=0)
                for i, c in zip(missing, chosen, strict=False):
                    pieces[s, i] = int(c.donor_id)
                repairs += 1
                traffic += (k + len(chosen)) / k
    exposure_years = samples * dt_s / YEAR_S
    rate = losses / exposure_years
    # 95% upper bound on the rate: the rule of three with no loss, else a normal bound.
    rate_upper = 3.0 / exposure_years if losses == 0 else rate + 2 * math.sqrt(losses) / exposure_years
    annual = -math.expm1(-rate)
    upper = -math.expm1(-rate_upper)
    avail = 1 - unavailable / max(samples, 1)
    return SimResult(
        profile=profile.name, segments=segments, years=years, losses=losses, annual_loss=annual,
        annual_loss_upper95=upper, nines=nines(annual), nines_lower95=nines(upper),
        availability=avail, availability_nines=nines(1 - avail),
        repairs_per_segment_year=repairs / exposure_years, repair_traffic_per_year=traffic / exposure_years,
        false_gone_per_donor_year=false_gone / (donors * years),
    )


def profiles() -> list[tuple[str, Profile]]:
    out = [("3x replication", replication(3))]
    out += [(f"default tier >= {m} donors", p) for m, p in DEFAULT_PROFILES]
    out.append(("16-of-48 repairing lazier, at 24", Profile(16, 48, 24)))
    out.append(("Storj (29-of-80, repair at 35), for reference", Profile(29, 80, 35)))
    return out


def _round(x: float, digits: int = 3) -> float | str:
    return "inf" if math.isinf(x) else round(x, digits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.durability")
    parser.add_argument("--quick", action="store_true", help="fewer segments and a quarter year (CI)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--segments", type=int, default=None)
    args = parser.parse_args(argv)
    churn = FleetChurn()
    segments = args.segments or (200 if args.quick else 2000)
    years = 0.25 if args.quick else 1.0
    donors = 240
    rows = []
    for label, profile in profiles():
        started = time.perf_counter()
        calc = estimate(profile, churn.calculator())
        sim = simulate(profile, churn, segments, donors, years=years, seed=7)
        rows.append({
            "label": label, "profile": profile.name, "k": profile.k, "n": profile.n, "repair_at": profile.repair_at,
            "overhead": round(profile.overhead, 2),
            "calculator": {"nines": _round(calc.nines, 2), "annual_loss": calc.annual_loss,
                           "availability": round(calc.availability, 6),
                           "availability_nines": _round(calc.availability_nines, 2),
                           "repairs_per_year": round(calc.repairs_per_year, 1),
                           "repair_traffic_per_year": round(calc.repair_traffic_per_year, 1)},
            "simulation": {"segments": sim.segments, "years": sim.years, "losses": sim.losses,
                           "annual_loss": sim.annual_loss, "annual_loss_upper95": sim.annual_loss_upper95,
                           "nines": _round(sim.nines, 2), "nines_lower95": _round(sim.nines_lower95, 2),
                           "availability": round(sim.availability, 6),
                           "availability_nines": _round(sim.availability_nines, 2),
                           "repairs_per_segment_year": round(sim.repairs_per_segment_year, 1),
                           "repair_traffic_per_year": round(sim.repair_traffic_per_year, 1),
                           "false_gone_per_donor_year": round(sim.false_gone_per_donor_year, 1)},
            "seconds": round(time.perf_counter() - started, 1),
        })
        r = rows[-1]
        print(f"{profile.name:14s} r{profile.repair_at:<3d} calc {r['calculator']['nines']!s:>6} nines "
              f"avail {r['calculator']['availability_nines']!s:>5} | sim losses {sim.losses:4d} "
              f"nines {r['simulation']['nines']!s:>6} (>= {r['simulation']['nines_lower95']!s}) "
              f"avail {r['simulation']['availability_nines']!s:>5} traffic {r['simulation']['repair_traffic_per_year']}x/yr "
              f"({r['seconds']} s)", flush=True)
    by_label = {r["label"]: r for r in rows}
    rep = by_label["3x replication"]
    wide = by_label[f"default tier >= {DEFAULT_PROFILES[0][0]} donors"]
    claims = {
        "replication_3x_nines": {"claim": "~1.4", "calculator": rep["calculator"]["nines"],
                                 "simulation": rep["simulation"]["nines"]},
        "wide_code_nines_at_3x": {"claim": "7-10", "profile": wide["profile"], "repair_at": wide["repair_at"],
                                  "calculator": wide["calculator"]["nines"],
                                  "simulation_lower95": wide["simulation"]["nines_lower95"]},
        "storj_29_of_80_repair_35": {"note": "with these donors (70% online) 29 of 35 pieces are rarely online together, "
                                             "so repairs stall and segments are lost",
                                     "calculator": by_label["Storj (29-of-80, repair at 35), for reference"]["calculator"],
                                     "simulation_losses": by_label["Storj (29-of-80, repair at 35), for reference"]
                                     ["simulation"]["losses"]},
    }
    report = {
        "meta": {"quick": args.quick, "python": platform.python_version(), "host_cpus": os.cpu_count(),
                 "donors": donors, "segments": segments, "years": years,
                 "churn": {"lifetime_days": churn.lifetime_s / DAY_S, "online": churn.online,
                           "online_session_h": churn.online_session_s / HOUR_S,
                           "gone_after_h": churn.gone_after_s / HOUR_S, "transfer_h": churn.transfer_s / HOUR_S},
                 "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")},
        "claims": claims,
        "profiles": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(claims, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
