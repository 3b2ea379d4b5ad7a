"""The first "Generate both" as a visitor sees it: start the app, open the page, click.

    python bench/bench_first_generate.py            # both variants, one round each
    python bench/bench_first_generate.py --rounds 2 --tab llm

Each variant starts ``python app.py`` in a fresh process with a fresh DEVEC_CACHE_DIR (so the
SmolLM2 GGUF conversion is still to do: a first server start), opens the page in Debian's
Chromium (Playwright), waits until the page is ready (the LLM tab's report is drawn), clicks
"Generate both" at once, and waits for both outputs.

  baseline   DEVEC_WARMUP=0: nothing loads before the click (what the app did before the warm-up)
  warm-up    DEVEC_WARMUP=1 (the default): the model's one-time work starts in the background at
             server start, while the default presets are decomposed and the page is built

Columns: server start → page ready, then page ready → both outputs (the number the issue's
target, ≤ 5 s, is about). Medians over rounds; a table for the README, no assertions. The machine's
load changes every number: compare the two rows of one run.
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


def one_run(warmup: bool, tab: str, timeout: float = 900.0) -> tuple[float, float]:
    """(server start → page ready, page ready → both outputs) in seconds."""
    from playwright.sync_api import sync_playwright

    port = _free_port()
    cache = tempfile.mkdtemp(prefix="devec-bench-first-")
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1", "DEVEC_CACHE_DIR": cache,
           "DEVEC_WARMUP": "1" if warmup else "0", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(Path(cache) / "server.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
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
        return t_ready - t0, t_done - t_ready
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(cache, ignore_errors=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--tab", choices=("llm", "flux"), default="llm")
    a = ap.parse_args(argv)
    if not CHROMIUM:
        sys.exit("needs Debian's chromium (apt-get install -y chromium) and playwright")
    rows = {"baseline (no warm-up)": [], "warm-up at server start": []}
    for _ in range(a.rounds):  # alternate, so a busy machine slows both alike
        for name, warm in (("baseline (no warm-up)", False), ("warm-up at server start", True)):
            rows[name].append(one_run(warm, a.tab))
            print(f"  {name}: start→ready {rows[name][-1][0]:.1f} s, ready→outputs {rows[name][-1][1]:.1f} s", flush=True)
    print(f"\nFirst 'Generate both' on the {a.tab} tab, fresh process and cache, median of {a.rounds} round(s); "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"| variant | server start → page ready (s) | page ready → both outputs (s) |")
    print("|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {statistics.median(x[0] for x in r):.1f} | {statistics.median(x[1] for x in r):.1f} |")


if __name__ == "__main__":
    main()
