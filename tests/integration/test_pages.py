"""The operator's and the donor's pages in a real headless browser, on a real fabric.

Debian's chromium, driven by Playwright (its Python package only: the browser is the
system's), loads the pages from the head of a fabric with two donors, each its own raylet.
Each page signs in as a person would (the API key; the donor id and secret from the donor's
``donor.json``), renders without a script error or a failed request, and shows what the API
reports: the donors' names and states, the counts by state, a fleet-size plot with points
drawn, the donor's sessions and uptime. The pause switch works end to end: clicked on the
donor page, the registry reports the donor paused, it leaves the active set with a
``drained`` session (never ``lost``) and the operator page, left open, shows it without a
reload; clicked again, the donor is resumed and becomes active again.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dgpt.config import Settings
from dgpt.head import fabric
from dgpt.head.paths import head_paths
from dgpt.sdk.client import Client
from tests.integration.conftest import fabric_settings, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

#: Debian's chromium (package `chromium`, installed by `make system`).
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: How long a page may take to show what the API reports: its refresh is every 3 s.
SHOWN_MS = 30_000


def page_url(settings: Settings, page: str) -> str:
    """A page of this fabric's head (its control-plane URL: http now, https once the API serves TLS)."""
    return f"{settings.local_head_url}/pages/{page}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian's chromium is not installed (as root: `make system`, or `apt-get install chromium`)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: `.venv/bin/pip install -c constraints.txt -e '.[test]'`")
    with sync_playwright() as p:
        # The system's browser, never one Playwright downloads.
        launched = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def pages_fabric(ray_test_env: None) -> Iterator[Settings]:
    """A head and two donors, both kept active (min_active 2): a resumed donor is activated again."""
    home = Path(tempfile.mkdtemp(prefix="dgpt-pg-"))
    settings = fabric_settings(home, sandbox="off")
    try:
        fabric.up(settings, 2, timeout_s=240)
        yield settings
    finally:
        fabric.down(settings)
        shutil.rmtree(home, ignore_errors=True)


class Tab:
    """A browser tab that records every script error, console error and failed request."""

    def __init__(self, context: Any) -> None:
        self.page = context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(f"script error: {exc}"))
        self.page.on("console", lambda msg: self.errors.append(f"console {msg.type}: {msg.text}")
                     if msg.type == "error" else None)
        self.page.on("requestfailed", lambda req: self.errors.append(f"request failed: {req.url} {req.failure}"))


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    # The API will serve HTTPS with a self-signed certificate: the test must not care which.
    made = browser.new_context(ignore_https_errors=True)
    yield made
    made.close()


def _client(settings: Settings) -> Client:
    return fabric.api_client(settings)


def _api_key(settings: Settings) -> str:
    return head_paths(settings.home)["api_key"].read_text().strip()


def _identity(settings: Settings, name: str) -> dict[str, str]:
    return dict(json.loads((settings.home / "donors" / name / "donor.json").read_text()))


def _polyline_points(tab: Tab, selector: str) -> int:
    """Coordinate pairs drawn in the plot's lines."""
    return int(tab.page.eval_on_selector_all(
        f"{selector} polyline", "lines => lines.reduce((n, l) => n + l.points.numberOfItems, 0)"))


def _operator(context: Any, settings: Settings) -> Tab:
    tab = Tab(context)
    tab.page.goto(page_url(settings, "operator"))
    tab.page.fill("#api-key", _api_key(settings))
    tab.page.click("#sign-in button[type=submit]")
    return tab


def test_the_operator_page_shows_the_live_fleet(pages_fabric: Settings, context: Any) -> None:
    from playwright.sync_api import expect

    with _client(pages_fabric) as client:
        donors = client.donors()
        cluster = client.cluster()
    assert len(donors) == 2 and all(d.state == "active" for d in donors)
    tab = _operator(context, pages_fabric)
    page = tab.page
    for d in donors:
        row = page.locator("#active-donors tbody tr", has_text=d.donor_id)
        expect(row).to_contain_text(d.name, timeout=SHOWN_MS)
        expect(row).to_contain_text(d.state.value)
        expect(row).to_contain_text(d.owner)
    expect(page.locator("#fleet-states .stat.active .n")).to_have_text(str(cluster.donors_by_state["active"]))
    expect(page.locator("#updated")).to_contain_text("updated")
    expect(page.locator("#error")).to_be_hidden()
    # The plots have drawn points: fleet size (its samples and now) and the fleet's credit.
    page.wait_for_function("Number(document.querySelector('#fleet-plot').dataset.points) >= 2", timeout=SHOWN_MS)
    assert _polyline_points(tab, "#fleet-plot") >= 2 and _polyline_points(tab, "#credit-plot") >= 2
    # Sections read from Ray's dashboard and job server loaded (nothing deployed, no job yet).
    expect(page.locator("#endpoints tbody")).to_contain_text("no endpoint is deployed")
    expect(page.locator("#jobs tbody")).to_contain_text("no job submitted yet")
    assert page.locator("#endpoints-error").is_hidden() and page.locator("#jobs-error").is_hidden()
    expect(page.locator("#autoscaler-summary")).to_contain_text("ticks")
    # The key lives in this tab's sessionStorage, sent as a bearer token: a reload stays signed in.
    assert page.evaluate("sessionStorage.getItem('dgpt.operator.apiKey')") == _api_key(pages_fabric)
    page.reload()
    expect(page.locator("#active-donors tbody")).to_contain_text(donors[0].name, timeout=SHOWN_MS)
    page.click("#sign-out")
    expect(page.locator("#api-key")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('dgpt.operator.apiKey')") is None
    assert tab.errors == []


def test_the_donor_page_pauses_and_resumes_its_donor(pages_fabric: Settings, context: Any) -> None:
    from playwright.sync_api import expect

    name = "donor-1"
    me = _identity(pages_fabric, name)
    donor_id = me["donor_id"]
    with _client(pages_fabric) as client:
        before = client.donor(donor_id)
        other = next(d for d in client.donors() if d.donor_id != donor_id)
    assert before.state == "active" and not before.paused
    operator = _operator(context, pages_fabric)
    tab = Tab(context)
    page = tab.page
    page.goto(page_url(pages_fabric, "donor"))
    page.fill("#donor-id", donor_id)
    page.fill("#donor-secret", me["donor_secret"])
    page.click("#sign-in button[type=submit]")
    expect(page.locator("#donor-name")).to_have_text(name, timeout=SHOWN_MS)
    expect(page.locator("#donor-summary")).to_contain_text("active")
    expect(page.locator("#sessions-total")).to_have_text(str(before.sessions_total))
    assert page.locator("#uptime").inner_text() not in ("", "-")
    open_session = page.locator("#sessions tbody tr", has_text="running")
    expect(open_session).to_have_count(1)
    expect(open_session).to_contain_text(str(before.sessions[-1].session_id))
    switch = page.locator("#pause-switch")
    expect(switch).to_have_attribute("aria-checked", "true")
    page.wait_for_function("Number(document.querySelector('#donor-credit-plot').dataset.points) >= 2")
    # The verification section is there exactly when the donor's view carries a record.
    raw = httpx.get(f"{pages_fabric.api_url}/donors/{donor_id}/own", verify=False,
                    headers={"Authorization": f"Bearer {me['donor_secret']}"}).json()
    section = page.locator("#verification-section")
    expect(section).to_be_visible() if raw.get("verification") is not None else expect(section).to_be_hidden()

    switch.click()
    with _client(pages_fabric) as client:
        wait_for(lambda: client.donor(donor_id).paused, 30, "the registry to report the donor paused")
        assert client.donor(donor_id).paused_by == "donor"
        wait_for(lambda: donor_id not in {d.donor_id for d in client.donors(state="active")}, 90,
                 "the paused donor to leave the active set")
        drained = wait_for(lambda: next((s for s in client.donor(donor_id).sessions
                                         if s.session_id == before.sessions[-1].session_id and s.ended_as), None),
                           60, "its session to end")
        assert (drained.ended_as.value if drained.ended_as else None, drained.end_reason) == ("drained", "paused")
        # Kept out: the autoscaler keeps two donors active, yet it stays out while paused.
        assert client.donor(donor_id).target == "standby" and client.donor(other.donor_id).state == "active"
    expect(switch).to_have_attribute("aria-checked", "false", timeout=SHOWN_MS)
    expect(page.locator("#pause-label")).to_have_text("Paused")
    expect(page.locator("#sessions tbody tr", has_text="paused")).to_contain_text("drained", timeout=SHOWN_MS)
    # The operator page, open all along, shows it without a reload.
    expect(operator.page.locator("#other-donors tbody tr", has_text=donor_id)).to_contain_text("paused (donor)",
                                                                                              timeout=SHOWN_MS)
    expect(operator.page.locator("#sessions tbody tr", has_text=name).first).to_contain_text("drained")

    switch.click()
    with _client(pages_fabric) as client:
        wait_for(lambda: not client.donor(donor_id).paused, 30, "the registry to report the donor resumed")
        wait_for(lambda: (d := client.donor(donor_id)).state == "active" and d.node_id is not None, 120,
                 "the resumed donor to be active again")
        sessions = client.donor(donor_id).sessions
    assert sessions[-1].ended_at is None and sessions[-1].session_id != before.sessions[-1].session_id
    assert all(s.ended_as is None or s.ended_as.value == "drained" for s in sessions), "no session ended lost"
    expect(switch).to_have_attribute("aria-checked", "true", timeout=SHOWN_MS)
    expect(page.locator("#donor-summary")).to_contain_text("active", timeout=SHOWN_MS)
    expect(page.locator("#error")).to_be_hidden()
    expect(operator.page.locator("#error")).to_be_hidden()
    assert tab.errors == [] and operator.errors == []


def test_a_wrong_donor_secret_is_refused_on_the_page(pages_fabric: Settings, context: Any) -> None:
    from playwright.sync_api import expect

    tab = Tab(context)
    page = tab.page
    page.goto(page_url(pages_fabric, "donor"))
    page.fill("#donor-id", _identity(pages_fabric, "donor-2")["donor_id"])
    page.fill("#donor-secret", "not-the-secret-of-this-donor")
    page.click("#sign-in button[type=submit]")
    expect(page.locator("#error")).to_contain_text("wrong donor secret", timeout=SHOWN_MS)
    expect(page.locator("#donor-secret")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('dgpt.donor.secret')") is None
    # The refused sign-in is the one failed request (Chromium logs its 401); no script failed.
    assert [e for e in tab.errors if "401" not in e] == []
