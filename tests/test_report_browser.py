"""compare's report.html in a real headless browser: the page loads and every image renders."""
import re
import shutil
import subprocess

import pytest

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-probe', imgs.length + ':' + imgs.map(i => i.complete && i.naturalWidth > 0 ? 1 : 0).join(''));
});</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from vitrim.compare import compare

    out = tmp_path_factory.mktemp("report")
    compare(methods=["tome", "evit", "dynamicvit"], sweeps={"tome": [{"r": 2}, {"r": 4}], "evit": [{"keep_rate": 0.7}],
                                                           "dynamicvit": [{"keep_rate": 0.7}]},
            batch_sizes=[4], warmup=0, repeats=1, iters=1, max_images=32, output=str(out), progress=False)
    return out / "report.html"


def test_report_is_one_self_contained_file(report):
    html = report.read_text()
    assert "<table>" in html and "Environment" in html and "What each method did to one image" in html
    srcs = re.findall(r"<img src='([^']*)'", html)
    assert len(srcs) == 3 + 3  # three plots, one picture per method
    assert all(s.startswith("data:image/png;base64,") for s in srcs)  # nothing outside the file
    assert "dynamicvit" in html and "shipped fine-tune" in html  # the embedded model's trained predictors


@pytest.mark.skipif(BROWSER is None, reason="no Chromium here (install the Debian package chromium; CI does)")
def test_report_renders_in_a_headless_browser(report, tmp_path):
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    profile = tmp_path / "profile"
    run = subprocess.run([BROWSER, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=15000",
                          "--enable-logging=stderr", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    found = re.search(r'data-probe="(\d+):([01]*)"', run.stdout)
    assert found, run.stdout[-2000:]
    count, loaded = int(found.group(1)), found.group(2)
    assert count == 6 and loaded == "1" * count  # every image decoded and has a size
    assert "Uncaught" not in run.stderr and "CONSOLE" not in run.stderr
    shot = tmp_path / "report.png"
    subprocess.run([BROWSER, *FLAGS, f"--user-data-dir={profile}", "--window-size=1200,2400",
                    f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=180)
    assert shot.is_file() and shot.stat().st_size > 20_000
