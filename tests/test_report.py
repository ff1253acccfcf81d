"""``vaepipe report``: the page a person opens the morning after, checked in a real browser.

Two nights are embedded with the tiny model on real images (night 1: Fashion-MNIST; night 2:
Fashion-MNIST, MNIST digits and a hostile shard whose keys and labels are HTML). Headless
Chromium (Debian ``chromium``) renders the report: no console message (the page carries a
Content-Security-Policy that allows no script and no image but data URIs, so an injected
handler or an external resource would be one), the headline numbers are in the DOM, and the
screenshot is not blank. The ``chromium`` fixture installs the package with apt-get when it
is missing and the tests run as root, as ``s3_server`` finds SeaweedFS; otherwise it skips.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from jobs.cli import cli
from pipeline.options import EmbedOptions
from pipeline.report import REPORT, build_report, write_report
from pipeline.report_data import headline, load_run, validation_density, wilson_interval
from pipeline.report_html import drift_table
from pipeline.run import run_embed
from tests.shard_helpers import png, tar_bytes

CHROMIUM = "/usr/bin/chromium"
HOSTILE_KEY = "<img src=x onerror=alert(1)>"
WINDOW = "1280,2400"


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium executable; installed with apt-get (root only) when missing, else a skip."""
    found = shutil.which("chromium") or (CHROMIUM if os.path.exists(CHROMIUM) else None)
    if found:
        return found
    why = "Chromium (Debian package `chromium`) is not installed"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{why} and cannot be installed here (needs root and apt-get): apt-get install -y chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            pytest.skip(f"{why}; `{' '.join(cmd)}` failed: {done.stderr.strip()[-300:]}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip(f"{why}; apt-get install chromium did not provide it")
    return found


def _hostile_shard(path: Path) -> None:
    """Two good images, a corrupt one and a bad label, with HTML in their keys and messages."""
    path.write_bytes(tar_bytes([
        ("fine-0.png", png(30, 28)), ("fine-1.png", png(200, 28)),
        (f"{HOSTILE_KEY}.png", b"<script>alert('message')</script>"),
        ("<b>label</b>.png", png(90, 28)), ("<b>label</b>.cls", b"<script>alert(2)</script>"),
    ]))


@pytest.fixture(scope="module")
def nights(tmp_path_factory, fashion_shards, mnist_shards, tiny_checkpoint) -> dict:
    """Two run dates under one OUT: night 1 Fashion-MNIST; night 2 with MNIST and a hostile shard."""
    root = tmp_path_factory.mktemp("report")
    night2 = root / "data2"
    for sub, src in (("fashion", fashion_shards), ("mnist", mnist_shards)):
        shutil.copytree(src, night2 / sub)
    (night2 / "hostile").mkdir()
    _hostile_shard(night2 / "hostile" / "bad.tar")
    out = root / "out"
    m1 = run_embed(str(fashion_shards), EmbedOptions(tiny_checkpoint, str(out), run_date="2026-11-27"))
    m2 = run_embed(f"{night2}/**/*.tar", EmbedOptions(tiny_checkpoint, str(out), run_date="2026-11-28"))
    return {"out": out, "night1": m1, "night2": m2}


def _render(chromium: str, page: Path, tmp_path: Path) -> tuple[str, str, Path]:
    """(DOM after load, Chromium's stderr, screenshot path) of a local page."""
    shot = tmp_path / "shot.png"
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
            f"--window-size={WINDOW}"]
    dom = subprocess.run(base + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    snap = subprocess.run(base + [f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True,
                          timeout=180)
    assert snap.returncode == 0 and shot.exists(), snap.stderr[-2000:]
    return dom.stdout, dom.stderr + snap.stderr, shot


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


# --------------------------------------------------------------------------- the browser

def test_report_renders_in_chromium_with_headline_numbers_and_no_console_errors(chromium, nights, tmp_path):
    out = nights["out"]
    night1, night2 = out / "dt=2026-11-27", out / "dt=2026-11-28"
    result = CliRunner().invoke(cli, ["report", str(night2), "--out", str(tmp_path / "r.html"), "--top", "24",
                                      "--compare", str(night1)])
    assert result.exit_code == 0, result.output
    page = Path(result.output.strip())
    dom, stderr, shot = _render(chromium, page, tmp_path)

    assert _console(stderr) == []
    m = json.loads((night2 / "_manifest.json").read_text())
    t = m["totals"]
    head = dom.split('id="headline"', 1)[1].split("</section>", 1)[0]
    text = " ".join(re.sub(r"<[^>]+>", " ", head).split())
    for number in (t["images_seen"], t["rows"], t["errors"]):
        assert f" {number:,} " in text
    flagged = headline(load_run(str(night2)))["flagged"]
    assert f"flagged {flagged:,} (" in text and m["model_id"] in text and m["calibration"] in text
    assert "2026-11-28" in text and "DirectRunner" in text and "previous: 2026-11-27" in text
    assert "95% Wilson CI" in text and "expected 1.00%" in text
    # hostile keys and messages are text, never markup
    assert 'onerror="alert' not in dom and "<script" not in dom and "<b>" not in dom
    assert "&lt;img src=x onerror=alert(1)&gt;" in dom and "&lt;script&gt;alert(2)&lt;/script&gt;" in dom
    assert dom.count('class="tile"') == 24 + 16  # top anomalies + normal rows for contrast

    pixels = Image.open(shot).convert("RGB")
    assert pixels.size == (1280, 2400)
    assert len(pixels.getcolors(maxcolors=1 << 20) or ()) > 256  # plots and thumbnails, not a blank page


def test_console_check_catches_script_and_outside_resources(chromium, tmp_path):
    """The console check of the test above is not vacuous: an error and a blocked load are seen."""
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><head><meta http-equiv=\"Content-Security-Policy\" "
                    "content=\"default-src 'none'; img-src data:\"></head><body><p>x</p>"
                    "<img src=\"http://127.0.0.1:9/a.png\"></body></html>")
    _, stderr, _ = _render(chromium, page, tmp_path)
    assert any("127.0.0.1:9" in line for line in _console(stderr))


# --------------------------------------------------------------------------- the page

def test_embed_writes_the_report_beside_the_partition(nights):
    page = (nights["out"] / "dt=2026-11-28" / REPORT).read_text()
    assert "vaepipe run report" in page and nights["night2"]["model_id"] in page
    assert REPORT not in nights["night2"]["files"]  # not a Parquet file: not in the partition's listing


def test_report_is_self_contained(nights):
    html = build_report(str(nights["out"] / "dt=2026-11-28"), top=8)
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)
    for ref in refs:  # every image decodes
        Image.open(io.BytesIO(base64.b64decode(ref.split(",", 1)[1]))).verify()
    assert "<script" not in html and "http://" not in html and "https://" not in html


def test_top_anomalies_are_the_highest_scores_with_their_thumbnails(nights):
    run = load_run(str(nights["out"] / "dt=2026-11-28"))
    html = build_report(run.partition_url, top=10)
    grid = html.split('id="top-anomalies"', 1)[1].split('id="normal-samples"', 1)[0]
    scores = [float(s) for s in re.findall(r"score ([-0-9.e+]+)</div>", grid)]
    best = np.sort(run.rows.column("anomaly_score").to_numpy())[::-1][:10]
    assert np.allclose(scores, best, rtol=1e-3)
    assert grid.count("<img ") == 10  # every one decoded from its shard


def test_dead_letters_are_listed_by_type_and_escaped(nights):
    html = build_report(str(nights["out"] / "dt=2026-11-28"))
    table = html.split('id="dead-letters"', 1)[1]
    assert "NotAnImage" in table or "ImageDecodeError" in table
    assert "BadLabel" in table and "&lt;b&gt;label&lt;/b&gt;" in table


def test_drift_section_is_a_table_when_the_manifest_has_one(nights):
    m = nights["night2"]
    if not m.get("drift"):
        pytest.skip("this manifest has no drift section")
    html = build_report(str(nights["out"] / "dt=2026-11-28"))
    assert 'id="drift"' in html and "flagged_rate p-value" in html


def test_drift_table_rows():
    drift = {"verdict": "fail", "failed": ["embedding_shift"],
             "thresholds": {"p_fail": 0.001, "p_warn": 0.01, "psi_warn": 0.1, "psi_fail": 0.25},
             "flagged_rate": {"p_value": 0.4, "verdict": "pass"},
             "percentile_uniform": {"ks_p": 0.005, "ks_verdict": "warn", "psi": 0.3, "psi_verdict": "fail",
                                    "verdict": "fail"},
             "score_vs_previous": {"verdict": "skipped", "reason": "no <previous> partition"},
             "embedding_shift": {"p_value": 1e-9, "verdict": "fail"}}
    html = drift_table(drift)
    assert html.count("<tr>") == 1 + 5
    assert "percentile_uniform PSI</td><td>0.3</td><td>warn ≥ 0.1, fail ≥ 0.25</td>" in html
    assert "skipped: no &lt;previous&gt; partition" in html and "fail < 0.001" not in html
    assert drift_table({}) == ""


def test_report_without_its_checkpoint_still_shows_the_night(nights, tmp_path):
    part = tmp_path / "dt=2026-11-28"
    shutil.copytree(nights["out"] / "dt=2026-11-28", part)
    m = json.loads((part / "_manifest.json").read_text())
    m["checkpoint"] = str(tmp_path / "gone.safetensors")
    (part / "_manifest.json").write_text(json.dumps(m))
    url = write_report(str(part))
    page = Path(url).read_text()
    assert url.endswith(REPORT) and "gone.safetensors not readable" in page and "Top " in page


def test_no_report_and_a_failing_report_never_fail_the_run(mnist_shards, tiny_checkpoint, tmp_path, monkeypatch,
                                                           caplog):
    out = tmp_path / "out"
    run_embed(str(mnist_shards), EmbedOptions(tiny_checkpoint, str(out), report=False))
    assert not (out / REPORT).exists()

    def broken(*args, **kwargs):
        raise OSError("disk full while drawing")

    monkeypatch.setattr("pipeline.report.build_report", broken)
    with caplog.at_level(logging.WARNING, logger="pipeline.report"):
        m = run_embed(str(mnist_shards), EmbedOptions(tiny_checkpoint, str(out), mode="overwrite",
                                                      skip_existing=False))
    assert m["reconciled"] and (out / "_SUCCESS").exists() and not (out / REPORT).exists()
    assert "report for" in caplog.text and "disk full while drawing" in caplog.text


# --------------------------------------------------------------------------- the numbers

def test_wilson_interval():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)
    for k, n in ((10, 1000), (3, 40), (40, 40)):  # the ends are the rates p0 whose z-test just rejects k/n
        for p0 in wilson_interval(k, n):
            assert (k / n - p0) ** 2 == pytest.approx(1.959964 ** 2 * p0 * (1 - p0) / n, rel=1e-5, abs=1e-12)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_validation_density_integrates_to_one_and_follows_the_quantiles():
    table = {"0.5": 1.0, "0.9": 2.0, "0.99": 4.0, "min": 0.0, "max": 5.0, "n": 1000}
    edges, dens = validation_density(table)
    assert list(edges) == [0.0, 1.0, 2.0, 4.0, 5.0]
    assert np.sum(dens * np.diff(edges)) == pytest.approx(1.0)
    assert dens[0] == pytest.approx(0.5) and dens[1] == pytest.approx(0.4)


def test_report_of_a_folder_that_is_no_partition_is_one_line(tmp_path):
    (tmp_path / "shards").mkdir()
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "shards")])
    assert res.exit_code == 1
    assert "not an embed partition (no _manifest.json)" in res.output and res.output.count("\n") == 1
