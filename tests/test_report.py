"""The HTML report: its structure read as text, then the page rendered in headless Chromium.

The browser tests need the Debian packages ``chromium`` and ``chromium-driver`` and the
Python package ``selenium``. Without Chromium they skip, saying so, except under CI
(``CI`` set), where they fail: CI installs Chromium and must run them.
"""

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import fusegen
from families import mini_model
from fusegen.report import SECTIONS, render_html, write_html_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ANALYSIS = [
    {"check": "logits vs HF", "max_abs_err": 3.2e-06, "note": "<b>not bold</b>"},
    {"check": "greedy tokens", "max_abs_err": 0.0, "note": "a & b", "extra": 7},
]


@pytest.fixture(scope="module")
def compiled():
    return fusegen.compile(mini_model("llama"))


@pytest.fixture(scope="module")
def report_file(compiled, tmp_path_factory) -> Path:
    return write_html_report(compiled, tmp_path_factory.mktemp("report") / "report.html", ANALYSIS)


def _svg(html: str, step: int) -> ET.Element:
    block = html.split(f'<details id="graph-{step:02d}"', 1)[1]
    return ET.fromstring(block[block.index("<svg"):block.index("</svg>") + len("</svg>")])


# --- the page as text -----------------------------------------------------------------------

def test_sections_in_order_with_headings(report_file):
    html = report_file.read_text()
    found = re.findall(r'<section id="([a-z]+)"><h2>', html)
    assert found == list(SECTIONS)


def test_analysis_not_run_and_title_escaped(compiled):
    html = render_html(compiled, None, title="<i>mine</i>")
    analysis = html.split('<section id="analysis">', 1)[1]
    assert "The analysis was not run." in analysis and "<table" not in analysis
    assert "<i>mine</i>" not in html and "&lt;i&gt;mine&lt;/i&gt;" in html


def test_analysis_columns_are_the_keys(report_file):
    analysis = report_file.read_text().split('<section id="analysis">', 1)[1]
    assert re.findall(r"<th>([^<]*)</th>", analysis) == ["check", "max_abs_err", "note", "extra"]
    assert "&lt;b&gt;not bold&lt;/b&gt;" in analysis and "a &amp; b" in analysis


def test_every_drawing_is_its_snapshot(compiled, report_file):
    """Every node and edge of every step is drawn, edges point down, boxes do not overlap,
    and exactly the nodes made by the step are highlighted."""
    html = report_file.read_text()
    for step, record in enumerate(compiled.report.records):
        svg = _svg(html, step)
        nodes = {g.get("data-name"): g for g in svg.iter("g")}
        assert set(nodes) == {n["name"] for n in record.snapshot}, record.name
        edges = {(p.get("data-from"), p.get("data-to")) for p in svg.iter("path") if p.get("data-from")}
        assert edges == {(i, n["name"]) for n in record.snapshot for i in n["inputs"]}, record.name
        made = {name for name, g in nodes.items() if "made" in g.get("class").split()}
        assert made == {n["name"] for n in record.snapshot if n["made_by"] == record.name}, record.name
        _check_geometry(svg, nodes, edges, record.name)
    assert len(_made(html, "fuse_attention")) == 2  # one fusegen.attention per layer


def _check_geometry(svg, nodes, edges, name):
    boxes = {n: {k: float(g.find("rect").get(k)) for k in ("x", "y", "width", "height")} for n, g in nodes.items()}
    width, height = float(svg.get("width")), float(svg.get("height"))
    for b in boxes.values():
        assert 0 <= b["x"] and b["x"] + b["width"] <= width, name
        assert 0 <= b["y"] and b["y"] + b["height"] <= height, name
    for src, dst in edges:
        assert boxes[src]["y"] < boxes[dst]["y"], (name, src, dst)
    rows: dict[float, list] = {}
    for b in boxes.values():
        rows.setdefault(b["y"], []).append((b["x"], b["x"] + b["width"]))
    for spans in rows.values():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), name


def _made(html: str, pass_name: str) -> list[str]:
    block = html.split(f'data-pass="{pass_name}"', 1)[1].split("</details>", 1)[0]
    return re.findall(r'<g class="node [a-z_]+ made" data-name="([^"]+)"', block)


def test_nothing_loaded_from_elsewhere(report_file):
    html = report_file.read_text()
    targets = re.findall(r'\b(?:src|href)="([^"]*)"', html)
    assert targets and all(t.startswith(("#", "data:")) for t in targets), targets
    assert "default-src 'none'" in html


# --- the page in a browser ------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        message = (f"{', '.join(missing)} not found: the browser tests need headless Chromium; "
                   "`make test-browser` installs it (apt-get install chromium chromium-driver) and runs them")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the report test needs the Python package selenium: pip install selenium")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(browser, report_file):
    """The report loaded, every graph opened through the page's own "open all" button;
    ``page.console`` holds the browser log of both."""
    from selenium.webdriver.common.by import By

    browser.get(report_file.as_uri())
    browser.find_element(By.CSS_SELECTOR, 'button[data-details="open"]').click()
    browser.console = browser.get_log("browser")
    return browser


@pytest.mark.browser
def test_browser_console_is_clean(page):
    severe = [e for e in page.console if e["level"] == "SEVERE"]
    assert not severe, severe
    network = [e for e in page.console if re.search(r"Failed to load|net::ERR|Refused to", e["message"])]
    assert not network, network
    assert page.execute_script("return performance.getEntriesByType('resource').length") == 0


@pytest.mark.browser
def test_sections_visible(page):
    from selenium.webdriver.common.by import By

    for name in SECTIONS:
        section = page.find_element(By.ID, name)
        assert section.is_displayed() and section.size["height"] > 0, name
        assert section.find_element(By.TAG_NAME, "h2").text, name


@pytest.mark.browser
def test_graphs_rendered_at_layout_size(page, compiled):
    sizes = page.execute_script(
        "return [...document.querySelectorAll('#graphs details')].map(d => {"
        " const s = d.querySelector('svg.graph').getBoundingClientRect();"
        " return [d.open, s.width, s.height, +d.querySelector('svg').getAttribute('width'),"
        " +d.querySelector('svg').getAttribute('height')]; })")
    assert len(sizes) == len(compiled.report.records)
    for is_open, width, height, want_w, want_h in sizes:
        assert is_open and width > 0 and height > 0
        assert (round(width), round(height)) == (want_w, want_h)


@pytest.mark.browser
def test_fuse_attention_nodes_highlighted(page, compiled):
    from selenium.webdriver.common.by import By

    record = next(r for r in compiled.report.records if r.name == "fuse_attention")
    drawing = page.find_element(By.CSS_SELECTOR, 'details[data-pass="fuse_attention"]')
    made = drawing.find_elements(By.CSS_SELECTOR, "g.node.made")
    assert sorted(g.get_attribute("data-name") for g in made) == sorted(
        n["name"] for n in record.snapshot if n["made_by"] == "fuse_attention")
    for g in made:
        assert g.is_displayed() and g.size["width"] > 0
        assert "fusegen.attention" in g.text
    plain = drawing.find_element(By.CSS_SELECTOR, "g.node.call_function:not(.made) rect")
    fill = "return getComputedStyle(arguments[0]).fill"
    assert page.execute_script(fill, made[0].find_element(By.TAG_NAME, "rect")) != page.execute_script(fill, plain)


@pytest.mark.browser
def test_kernel_sources_shown(page, compiled):
    from selenium.webdriver.common.by import By

    kernels = compiled.facts["kernels"]
    assert kernels
    for k in kernels:
        article = page.find_element(By.ID, f"kernel-{k['group']}")
        source = article.find_element(By.TAG_NAME, "pre")
        assert source.is_displayed()
        text = source.get_attribute("textContent")
        module = compiled.graph_module.get_submodule(k["group"])
        assert "@triton.jit" in text and text.strip() == module.source.strip()
        assert k["source_hash"] in article.text and k["schedule"] in article.text


@pytest.mark.browser
def test_analysis_table_shown(page):
    from selenium.webdriver.common.by import By

    table = page.find_element(By.CSS_SELECTOR, "#analysis table")
    assert table.is_displayed()
    assert [th.text for th in table.find_elements(By.TAG_NAME, "th")] == ["check", "max_abs_err", "note", "extra"]
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
    assert rows == [["logits vs HF", "3.2e-06", "<b>not bold</b>", ""], ["greedy tokens", "0", "a & b", "7"]]
    assert not table.find_elements(By.TAG_NAME, "b")


@pytest.mark.browser
def test_screenshot(page, tmp_path):
    path = tmp_path / "report.png"
    assert page.save_screenshot(str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
