"""The dashboard end to end: a real 16-node cluster driven through headless Chromium.

Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them when
missing; without them this test is skipped and says why), driven by selenium
with the flags from the shared environment notes. Node 1 serves the page; the
test submits through the page's form, waits until the page shows the message on
all 16 nodes, kills a node's process and waits until the page shows that node
and each of its links down. A screenshot of the page is saved in the test's
directory (and to ``$GOSSIP_DASHBOARD_SCREENSHOT`` when set).
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import threads

from gossip.cluster import LocalCluster
from gossip.config import ClusterConfig, dump_config, web_url
from gossip.topology import generate_config

reactor: Any = _reactor
pytestmark = pytest.mark.cluster

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
NODES = 16
# Fixed blocks in the 31xxx range, clear of the other tests' random ports and of a
# local cluster on 17xxx; the first whose ports are all free is used.
PORT_BASES = (31000, 31300, 31600)
PAGE_TIMEOUT = 60.0


def _missing() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} not found: install the Debian package {package} (.ci/run does)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install 'gossip[test]')"
    return None


def _free(ports: range) -> bool:
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def write_config(tmp: Path) -> tuple[Path, ClusterConfig]:
    """16 nodes on loopback: peers at BASE+i, clients at BASE+100+i, web at BASE+200+i."""
    for base in PORT_BASES:
        if _free(range(base + 1, base + 301)):
            config = generate_config(
                NODES, base_peer_port=base, base_client_port=base + 100, web=True
            )
            path = tmp / "cluster.toml"
            path.write_text(dump_config(config))
            return path, config
    raise AssertionError(f"no free block of 300 loopback ports at any of {PORT_BASES}")


def browser(profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must not try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait_until(driver: Any, check: Callable[[Any], Any], what: str) -> Any:
    """Selenium's WaitDriver with a deadline and a message naming what was awaited."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, PAGE_TIMEOUT, poll_frequency=0.2).until(
        check, f"the page did not show {what} within {PAGE_TIMEOUT:g} s"
    )


def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Selenium blocks: run it beside the reactor, which keeps watching the nodes."""
    return threads.deferToThread(fn, *args)


@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
@pytest_twisted.ensureDeferred
async def test_dashboard_shows_a_message_reach_every_node_and_a_dead_node_s_links_down(
    tmp_path: Path,
) -> None:
    """Submit through the page's form on node 1's dashboard; the page shows the message
    on all 16 nodes (16 nodes marked as holding it, "16/16" in the summary, a hop arrow
    into each of the 15 others); then SIGKILL node 16: the page shows node 16 down and
    each of its links down while the other links stay up. Saves a screenshot."""
    config_path, config = write_config(tmp_path)
    url = web_url(config.node(1).web_listen)
    assert url is not None
    cluster = LocalCluster(reactor, config_path, tmp_path, extra_args=["--memory"])
    cluster.start_all()
    driver = None
    try:
        await cluster.wait_ready(timeout=90)
        driver = await in_thread(browser, tmp_path / "chromium-profile")
        await in_thread(driver.get, url)  # "/" redirects to the dashboard

        def links_up(d: Any) -> bool:
            states = [
                e.get_attribute("data-state") for e in d.find_elements("css selector", ".link")
            ]
            return len(states) == len(config.edges()) and set(states) == {"up"}

        await in_thread(wait_until, driver, links_up, "every link up")
        assert driver.current_url.rstrip("/").endswith("/dashboard")

        from selenium.webdriver.support.ui import Select

        def submit(d: Any) -> str:
            d.find_element("id", "message").send_keys("Apple from the browser")
            Select(d.find_element("id", "submit-node")).select_by_value("3")
            d.find_element("id", "submit").click()
            result = d.find_element("id", "submit-result")
            wait_until(d, lambda _: result.get_attribute("data-ok") == "true", "the submit's id")
            return str(result.get_attribute("data-id"))

        mid = await in_thread(submit, driver)
        assert len(mid) == 22

        def everywhere(d: Any) -> bool:
            holding = d.find_elements("css selector", '.node[data-has-message="true"]')
            summary = d.find_element("id", "trace-summary")
            return len(holding) == NODES and summary.get_attribute("data-reached") == str(NODES)

        await in_thread(wait_until, driver, everywhere, "the message on all 16 nodes")
        hops = driver.find_elements("css selector", "#hops line")
        assert sorted(int(h.get_attribute("data-to")) for h in hops) == [
            n for n in sorted(config.nodes) if n != 3
        ]
        origin = driver.find_elements("css selector", '.node[data-origin="true"]')
        assert [o.get_attribute("data-node") for o in origin] == ["3"]
        assert "16/16" in driver.find_element("id", "trace-summary").text
        # Every node's record, as the nodes themselves answer it, is what the page drew.
        for n in config.nodes:
            status = await cluster.node_status(n)
            assert status is not None and status["message_count"] == 1

        victim = NODES
        await cluster.kill_node(victim)
        neighbours = set(config.node(victim).neighbours)

        def victim_down(d: Any) -> bool:
            node = d.find_element("css selector", f'.node[data-node="{victim}"]')
            if node.get_attribute("data-state") != "down":
                return False
            for link in d.find_elements("css selector", ".link"):
                a, b = int(link.get_attribute("data-a")), int(link.get_attribute("data-b"))
                want = "down" if victim in (a, b) else "up"
                if link.get_attribute("data-state") != want:
                    return False
            return True

        await in_thread(wait_until, driver, victim_down, f"node {victim} and its links down")
        down = [
            (int(e.get_attribute("data-a")), int(e.get_attribute("data-b")))
            for e in driver.find_elements("css selector", '.link[data-state="down"]')
        ]
        assert sorted(down) == sorted((min(victim, p), max(victim, p)) for p in neighbours)
        row = driver.find_element("css selector", f'#node-table tr[data-node="{victim}"]')
        assert row.get_attribute("data-state") == "down"

        shot = tmp_path / "dashboard.png"
        assert await in_thread(driver.save_screenshot, str(shot))
        assert shot.stat().st_size > 10_000
        copy = os.environ.get("GOSSIP_DASHBOARD_SCREENSHOT")
        if copy:
            shutil.copyfile(shot, copy)
    finally:
        if driver is not None:
            await in_thread(driver.quit)
        await cluster.stop_all()
