"""End to end in a real browser: Playwright drives Debian's Chromium (/usr/bin/chromium).

What a visitor does, one behaviour per test (issue 15): a pick sends one request and open + Escape
on the preset box changes nothing; a failed action shows one toast that closes itself and leaves
no error on unrelated outputs; outputs say what made them and turn stale when settings change;
history grows; a settings link restores the page in a fresh tab; the model being edited shows in a
labelled third column; hovering a heat-map cell names its module; the style tab renders.

Screenshots go to a temp folder. README's images are updated on purpose, by a command:
    python -m tests.test_browser --screenshots docs/
Without Chromium or Playwright the tests are skipped, except under CI=true, where they fail.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOT_DIR = Path(os.environ.get("DEVEC_SCREENSHOTS", "")) if os.environ.get("DEVEC_SCREENSHOTS") else None
JOIN = "/queue/join"  # every backend event is one POST to Gradio's queue


def _chromium() -> str | None:
    return CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")


def _missing(why: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why}: the browser tests must run in CI")
    pytest.skip(why)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    if not _chromium():
        _missing("Debian chromium not installed (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("playwright not installed (pip install -r requirements-dev.txt)")
    from tests.conftest import launched_app

    with launched_app(tmp_path_factory.mktemp("devec_cache")) as url:
        yield url


@pytest.fixture(scope="module")
def browser(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium(), args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, app_url):
    pg = browser.new_page(viewport={"width": 1400, "height": 1100})
    pg.joins = []  # the queue requests this page sent
    pg.on("request", lambda r: pg.joins.append(r.post_data or "") if JOIN in r.url and r.method == "POST" else None)
    pg.goto(app_url)
    pg.wait_for_function("document.querySelector('#llm-report')?.innerText.includes('τ =')", timeout=60_000)
    yield pg
    pg.close()


def _shot(page, name: str, tmp_path: Path) -> Path:
    out = (SHOT_DIR or tmp_path) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out), full_page=True)
    assert out.stat().st_size > 10_000
    return out


def _value(page, sel: str) -> str:
    return page.eval_on_selector(sel, "el => el.value")


def _set_number(page, sel: str, value: str):
    box = page.locator(sel)
    box.fill(value)
    box.blur()


def _wait_idle(page, ms: int = 1500):
    """Let queued events reach the server (a settle time, not an assertion on speed)."""
    page.wait_for_timeout(ms)
    page.wait_for_function("!document.querySelector('.progress-text, .eta-bar')", timeout=60_000)


def _generate(page, prefix: str, n_before: int):
    page.locator(f"#{prefix}-generate").click()
    page.wait_for_function(  # the history's newest entry is "#n · τ …" (its number, not a count of bold text)
        f"(document.querySelector('#{prefix}-history')?.innerText || '').includes('#{n_before + 1} ·')", timeout=300_000)


def test_open_escape_changes_nothing_and_a_pick_sends_one_request(page):
    from devec_core import studio

    # the page opens with the default preset already there: one request at most (the visit's
    # check for settings in the URL), nothing that loads a preset
    _wait_idle(page)
    assert len(page.joins) <= 1, page.joins
    # out-of-range τ typed into the box is clamped *and* applied: the report follows the box
    for typed, shown in (("1.5", "1.00"), ("0", "0.05")):
        _set_number(page, "#llm-tau input[type=number]", typed)
        page.wait_for_function(f"document.querySelector('#llm-report').innerText.includes('τ = {shown}')", timeout=60_000)
        assert float(_value(page, "#llm-tau input[type=number]")) == float(shown)
    _set_number(page, "#llm-tau input[type=number]", "0.9")
    page.wait_for_function("document.querySelector('#llm-report').innerText.includes('τ = 0.90')", timeout=60_000)
    _set_number(page, "#llm-van-0 input[type=number]", "-0.4")
    n = len(page.joins)
    # open the preset box, then Escape; open it again and click elsewhere
    page.locator("#llm-preset input").click()
    page.keyboard.press("Escape")
    page.locator("#llm-preset input").click()
    page.locator("#llm-report").click()
    _wait_idle(page)
    assert len(page.joins) == n, page.joins[n:]
    assert float(_value(page, "#llm-tau input[type=number]")) == 0.9
    assert float(_value(page, "#llm-van-0 input[type=number]")) == -0.4
    assert "τ = 0.90" in page.locator("#llm-report").inner_text()

    # picking another preset sends exactly one request and opens it
    other = next(t for t, i in studio.preset_choices("flux") if i == "style-flux-independent")
    page.get_by_role("tab", name="Style mixing (FLUX)").click()
    n = len(page.joins)
    page.locator("#flux-preset input").click()
    page.get_by_role("option", name=other).click()
    page.wait_for_function("document.querySelector('#flux-info').innerText.includes('independent')", timeout=120_000)
    _wait_idle(page)
    assert len(page.joins) - n == 1, page.joins[n:]


def test_failed_action_one_toast_that_closes_and_no_error_elsewhere(page):
    from devec_core import studio

    llama = next(t for t, i in studio.preset_choices("llm") if i == "llama2-toxicity")
    page.locator("#llm-preset input").click()
    page.get_by_role("option", name=llama).click()
    toast = page.locator(".toast-body")
    toast.first.wait_for(timeout=60_000)
    assert toast.count() == 1
    text = toast.first.inner_text()
    assert "your own target adapter" in text and "/tmp/" not in text and "gradio/" not in text
    # the error is shown on the action's own status (the report), not on the other outputs
    errs = page.locator("#llm-controls .error, #llm-results .error, #llm-spectrum .error, #llm-dims .error, #llm-norms .error")
    on_report = page.locator("#llm-report .error")
    assert errs.count() == on_report.count() <= 1, errs.count()
    # the toast closes itself
    toast.first.wait_for(state="detached", timeout=30_000)
    # the page still shows the pool that was loaded (state untouched)
    assert "smollm2" in page.locator("#llm-info").inner_text()


def test_outputs_say_what_made_them_turn_stale_and_history_grows(page, tmp_path):
    from devec_core import studio

    preset = studio.get_preset(studio.default_preset("llm"))
    assert page.locator("#llm-prompt textarea").input_value() == preset.prompts[0]
    # a preset prompt from the examples fills the box
    page.locator("#llm-examples").get_by_text(preset.prompts[1]).click()
    page.wait_for_function(f"document.querySelector('#llm-prompt textarea').value === {preset.prompts[1]!r}", timeout=10_000)
    _set_number(page, "#llm-tau input[type=number]", "0.9")
    page.wait_for_function("document.querySelector('#llm-report').innerText.includes('τ = 0.90')", timeout=60_000)
    _set_number(page, "#llm-van-0 input[type=number]", "-0.25")  # linked: DeVec's λ follows
    page.wait_for_function("document.querySelector('#llm-uni-0 input[type=number]').value === '-0.25'", timeout=10_000)
    _set_number(page, "#llm-seed input", "3")

    _generate(page, "llm", 0)
    assert _value(page, "#llm-out-vanilla textarea").strip() and _value(page, "#llm-out-devec textarea").strip()
    note = page.locator("#llm-gen-note").inner_text()
    assert "τ 0.90" in note and "isolate" in note and "toxic -0.25/-0.25" in note and "seed 3" in note, note
    assert "toxicity" in page.locator("#llm-time-devec").inner_text()
    page.wait_for_function("document.getElementById('llm-results').dataset.made === '1'", timeout=10_000)
    assert page.locator("#llm-results.devec-stale").count() == 0
    # any change of the settings marks the outputs out of date
    _set_number(page, "#llm-tau input[type=number]", "0.8")
    page.wait_for_selector("#llm-results.devec-stale", state="attached", timeout=10_000)
    page.wait_for_function("document.querySelector('#llm-report').innerText.includes('τ = 0.80')", timeout=60_000)
    _generate(page, "llm", 1)
    page.wait_for_selector("#llm-results.devec-stale", state="detached", timeout=10_000)  # fresh again
    hist = page.locator("#llm-history").inner_text()
    assert "#2" in hist and "#1" in hist and hist.index("#2") < hist.index("#1"), hist
    assert "τ 0.80" in hist and "τ 0.90" in hist
    page.wait_for_selector("#llm-spectrum img", timeout=30_000)
    # the third column (the model being edited) follows the pair: the screenshot shows all three
    page.wait_for_function("document.querySelector('#llm-time-edited').innerText.includes('toxicity')", timeout=300_000)
    _shot(page, "screenshot.png", tmp_path)


def test_settings_link_restores_the_state_in_a_fresh_page(page, browser, app_url):
    _set_number(page, "#llm-tau input[type=number]", "0.7")
    page.wait_for_function("document.querySelector('#llm-report').innerText.includes('τ = 0.70')", timeout=60_000)
    page.locator("#llm-link-1 input").uncheck()  # DeVec's λ of the 2nd vector on its own
    _set_number(page, "#llm-van-1 input[type=number]", "0.5")
    _set_number(page, "#llm-uni-1 input[type=number]", "-0.3")
    page.locator("#llm-on-2 input").uncheck()
    page.locator("#llm-prompt textarea").fill("Name a colour.")
    _set_number(page, "#llm-seed input", "11")
    _generate(page, "llm", 0)
    href = page.eval_on_selector("#llm-settings-link a", "a => a.getAttribute('href')")
    assert href.startswith("?") and "tau=0.7" in href, href

    fresh = browser.new_page(viewport={"width": 1400, "height": 1100})
    try:
        fresh.goto(app_url.rstrip("/") + "/" + href)
        fresh.wait_for_function("document.querySelector('#llm-report')?.innerText.includes('τ = 0.70')", timeout=120_000)
        fresh.wait_for_function("document.querySelector('#llm-prompt textarea').value === 'Name a colour.'", timeout=30_000)
        assert float(_value(fresh, "#llm-tau input[type=number]")) == 0.7
        assert float(_value(fresh, "#llm-van-1 input[type=number]")) == 0.5
        assert float(_value(fresh, "#llm-uni-1 input[type=number]")) == -0.3
        assert not fresh.locator("#llm-link-1 input").is_checked()
        assert not fresh.locator("#llm-on-2 input").is_checked()
        assert _value(fresh, "#llm-seed input") == "11"
    finally:
        fresh.close()


def test_the_model_being_edited_is_a_labelled_third_column(page):
    """LLM tab (isolate, the toxic fine-tune as target): the third column, on by default, shows the
    model before repair — labelled, scored, and not a copy of either side — after the pair; with the
    toxic λ at 1 on the vanilla side, vanilla *is* that model (same seed and sampling): same text."""
    assert page.locator("#llm-show-edited input").is_checked()
    edited_js = "(document.querySelector('#llm-out-edited textarea')?.value || '').trim()"
    _generate(page, "llm", 0)
    page.wait_for_function(f"{edited_js}.length > 0", timeout=300_000)
    head = page.locator("#llm-time-edited").inner_text()
    assert "Before the edit" in head and "toxic" in head and "toxicity" in head, head
    assert "ΔW(toxic)" in page.locator("#llm-col-edited").inner_text()  # the output's label: W₀ + 1·ΔW(toxic)
    edited = _value(page, "#llm-out-edited textarea")
    van, dv = _value(page, "#llm-out-vanilla textarea"), _value(page, "#llm-out-devec textarea")
    assert edited.strip() and edited != van and edited != dv
    page.wait_for_function("document.querySelector('#llm-history').innerText.includes('Before the edit')", timeout=30_000)

    _set_number(page, "#llm-van-0 input[type=number]", "1")  # toxic: vanilla W0 + 1·ΔW_toxic
    page.wait_for_function("document.querySelector('#llm-uni-0 input[type=number]').value === '1'", timeout=10_000)
    _generate(page, "llm", 1)
    page.wait_for_function(f"{edited_js}.length > 0", timeout=300_000)
    assert _value(page, "#llm-out-edited textarea") == _value(page, "#llm-out-vanilla textarea") == edited

    page.locator("#llm-show-edited input").uncheck()  # off: the column goes away
    page.locator("#llm-col-edited").wait_for(state="hidden", timeout=30_000)


def test_heat_map_cells_name_their_module_on_hover(page):
    cells = page.locator("#llm-dims g.devec-cell")
    assert cells.count() == 210  # SmolLM2: 30 layers × 7 projections
    cell = cells.nth(45)
    mod = cell.get_attribute("data-module")
    assert mod.startswith("model.layers.")
    tip = cell.locator(".devec-tip")
    assert not tip.is_visible()
    cell.locator("rect").hover()
    tip.wait_for(state="visible", timeout=5_000)
    text = tip.text_content()
    assert mod in text and "shared dim" in text and "shared fraction" in text, text
    assert mod in cell.locator("title").text_content()  # the browser's own tooltip says it too
    # the map follows τ
    _set_number(page, "#llm-tau input[type=number]", "0.95")
    page.wait_for_function("document.querySelector('#llm-dims svg')?.textContent.includes('τ = 0.95')", timeout=60_000)


def test_style_tab_renders_two_different_scored_images_with_settings_inside(page, tmp_path):
    """The FLUX tab's offline preset (the tiny FLUX-architecture model): Generate shows a vanilla and a
    DeVec image strip that differ, each with its scores; the PNGs carry their settings."""
    import io
    import urllib.request

    from PIL import Image

    page.get_by_role("tab", name="Style mixing (FLUX)").click()
    page.wait_for_function("document.querySelector('#flux-prompt textarea')?.value === 'a red house'", timeout=60_000)
    _generate(page, "flux", 0)
    page.wait_for_function("document.querySelector('#flux-out-vanilla img')?.src && document.querySelector('#flux-out-devec img')?.src",
                           timeout=60_000)
    blobs = []
    for k in ("vanilla", "devec"):
        src = page.eval_on_selector(f"#flux-out-{k} img", "el => el.src")
        with urllib.request.urlopen(src, timeout=30) as r:  # the app's own file route (localhost)
            blobs.append(r.read())
    assert blobs[0] != blobs[1], "vanilla and DeVec images are identical"
    for b in blobs:
        im = Image.open(io.BytesIO(b))
        assert '"tau": 0.85' in im.info.get("devec", ""), im.info.keys()
    for k in ("vanilla", "devec"):
        txt = page.locator(f"#flux-time-{k}").inner_text()
        assert "palette" in txt and "×" in txt and "content" in txt, txt
    assert page.locator("img[alt='palette']").count() >= 1
    # the history's thumbnails load (inline PNGs: the files' own paths are not served)
    page.wait_for_function("(() => { const ims = [...document.querySelectorAll('#flux-history img')];"
                           " return ims.length >= 2 && ims.every(i => i.complete && i.naturalWidth > 0); })()", timeout=30_000)
    _shot(page, "screenshot_style.png", tmp_path)


if __name__ == "__main__":  # python -m tests.test_browser --screenshots docs/
    if len(sys.argv) != 3 or sys.argv[1] != "--screenshots":
        sys.exit("usage: python -m tests.test_browser --screenshots FOLDER")
    os.environ["DEVEC_SCREENSHOTS"] = str(Path(sys.argv[2]).resolve())
    sys.exit(pytest.main(["-q", __file__, "-k", "history_grows or style_tab"]))
