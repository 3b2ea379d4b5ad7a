"""The first "Generate both" as a visitor sees it: start the app, open the page, click.

    python bench/bench_first_generate.py            # the three variants, one round each
    python bench/bench_first_generate.py --rounds 2 --tab llm
    python bench/bench_first_generate.py --app-root /tmp/before   # another checkout's app.py (before/after)

Each variant starts ``python app.py`` in a fresh process, opens the page in Debian's Chromium
(Playwright), waits until the page is ready (the tab's report is drawn), clicks "Generate both" at
once, and waits for both outputs.

  baseline       DEVEC_WARMUP=0, fresh DEVEC_CACHE_DIR: nothing loads before the click
  warm-up        DEVEC_WARMUP=1 (the default), fresh DEVEC_CACHE_DIR: a first server start (SmolLM2's
                 GGUF conversion and the presets' decompositions still to do), the model's one-time
                 work in the background while the page is built
  warm-up, 2nd   the same with the cache the previous variant left (converted model, decompositions
                 on disk): every later start of the same install

Columns: server start → page ready, then page ready → both outputs (the number the issue's
target, ≤ 5 s, is about). Medians over rounds; a table for the README, no assertions. Under it,
each run's stages as the server logged them ("warm-up …" and "timings … generate" lines): where
the seconds went. The machine's load changes every number: compare the rows of one run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stages(log_text: str) -> list[str]:
    """The server's own stage lines: its warm-up and each generation's timings."""
    keep = ("warm-up ", "timings ", "not ready")
    return [ln.split(" INFO ", 1)[-1].split(" WARNING ", 1)[-1] for ln in log_text.splitlines() if any(k in ln for k in keep)]


def one_run(warmup: bool, tab: str, cache: str, root: Path = ROOT, timeout: float = 900.0) -> tuple[float, float, list[str]]:
    """(server start → page ready, page ready → both outputs, the server's stage lines); seconds."""
    from playwright.sync_api import sync_playwright

    port = _free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1", "DEVEC_CACHE_DIR": cache,
           "DEVEC_WARMUP": "1" if warmup else "0", "GRADIO_ANALYTICS_ENABLED": "False"}
    log_path = Path(cache) / f"server-{time.time_ns()}.log"
    log = open(log_path, "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app exited ({proc.returncode}); see {log.name}")
            try:
                urllib.request.urlopen(url, timeout=2).read(1)
                break
            except OSError:
                if time.perf_counter() - t0 > timeout:
                    raise
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            if tab == "flux":
                page.get_by_role("tab", name="Style mixing (FLUX)").click()
            page.wait_for_function(f"document.querySelector('#{tab}-report')?.innerText.includes('τ =')", timeout=timeout * 1000)
            t_ready = time.perf_counter()
            page.locator(f"#{tab}-generate").click()
            page.wait_for_function(f"document.querySelectorAll('#{tab}-history strong').length > 0", timeout=timeout * 1000)
            t_done = time.perf_counter()
            browser.close()
        time.sleep(0.5)  # the handler's timing line follows its answer
        return t_ready - t0, t_done - t_ready, _stages(log_path.read_text())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


VARIANTS = (("baseline (no warm-up)", False, "fresh"), ("warm-up, first start", True, "fresh"), ("warm-up, second start (cache kept)", True, "kept"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--tab", choices=("llm", "flux"), default="llm")
    ap.add_argument("--app-root", type=Path, default=ROOT, help="the checkout whose app.py runs (default: this one)")
    a = ap.parse_args(argv)
    if not CHROMIUM:
        sys.exit("needs Debian's chromium (apt-get install -y chromium) and playwright")
    rows: dict[str, list] = {name: [] for name, _, _ in VARIANTS}
    for _ in range(a.rounds):  # alternate, so a busy machine slows every variant alike
        cache = None
        for name, warm, which in VARIANTS:
            if which == "fresh":
                if cache:
                    shutil.rmtree(cache, ignore_errors=True)
                cache = tempfile.mkdtemp(prefix="devec-bench-first-")
            load = os.getloadavg()[0]
            rows[name].append(one_run(warm, a.tab, cache, a.app_root.resolve()))
            r = rows[name][-1]
            print(f"  {name}: start→ready {r[0]:.1f} s, ready→outputs {r[1]:.1f} s (load average before: {load:.1f})", flush=True)
            for ln in r[2]:
                print(f"      {ln}", flush=True)
        shutil.rmtree(cache, ignore_errors=True)
    print(f"\nFirst 'Generate both' on the {a.tab} tab, app from {a.app_root}, median of {a.rounds} round(s); "
          f"load average now {os.getloadavg()[0]:.1f}")
    print("| variant | server start → page ready (s) | page ready → both outputs (s) |")
    print("|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {statistics.median(x[0] for x in r):.1f} | {statistics.median(x[1] for x in r):.1f} |")


if __name__ == "__main__":
    main()
