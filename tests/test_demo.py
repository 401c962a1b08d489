"""The Gradio demo: limits and bad files as messages (no browser), then end to end in headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import random_image

ROOT = Path(__file__).parents[1]
pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def app():
    sys.path.insert(0, str(ROOT / "demo"))
    try:
        import app as demo_app
    finally:
        sys.path.remove(str(ROOT / "demo"))
    return demo_app


@pytest.fixture(scope="module")
def demo(app, tiny):
    from kensa_vl.eval.inspector import Inspector

    model, processor = tiny
    return app.Demo(Inspector(model, processor, max_new_tokens=4))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i in range(4):
        paths.append(str(folder / f"p{i}.png"))
        random_image(200 + 20 * i, 160, i).save(paths[-1])
    (folder / "broken.png").write_bytes(b"not a png")
    return paths, str(folder / "broken.png")


def test_the_gallery_shows_the_heatmap_of_a_comparing_model(app, photos):
    import numpy as np

    from kensa_vl.eval.inspector import Inspector
    from kensa_vl.eval.plots import draw_judgement
    from kensa_vl.train.build import build_tiny

    model, processor = build_tiny(tile_size=112, max_tiles=4, reference_comparison=True, dct=True,
                                  reference_encoders=["dct"])  # fmt: skip
    inspector = Inspector(model, processor, max_new_tokens=0)
    paths, _ = photos
    demo = app.Demo(inspector)
    gallery, rows, _ = demo.run(paths[:2], [], "", "nut", [paths[3]])
    drawn = np.asarray(gallery[0][0], dtype=float)
    plain = np.asarray(draw_judgement(app.open_image(paths[3], "query"), [], rows[0][1]), dtype=float)
    (session,) = demo.sessions.values()  # the support set's own inspector
    result = session.judge(app.open_image(paths[3], "query"))[0]
    assert result.heatmap is not None and np.abs(drawn - plain).mean() > 10  # blended, not the photo alone
    # a named defective example: a result judged defective says it resembles it, numbered as uploaded, with the
    # pointer's share; one judged good resembles no defect (thresholds 0 and 1: every photo defective, every one good)
    for threshold, like in ((0.0, True), (1.0, False)):
        judging = app.Demo(Inspector(model, processor, max_new_tokens=0, threshold=threshold))
        gallery, rows, _ = judging.run(paths[:2], [paths[2]], "a dark scratch", "nut", [paths[3]])
        if like:
            assert rows[0][4].startswith("defective example 1: a dark scratch (") and rows[0][4].endswith(")")
            assert ", like defective example 1: a dark scratch" in gallery[0][1]
        else:
            assert rows[0][1] == "good" and rows[0][4] == "" and ", like " not in gallery[0][1]


def test_each_support_set_keeps_its_own_second_tile_budget(app, photos, monkeypatch):
    """KENSA_FINE_TILES and KENSA_PHASES: the demo judges at a second budget and a second phase too, and each user's
    support set keeps its own state in every look (a second user's examples never replace the first's)."""
    from kensa_vl.eval.inspector import Inspector
    from kensa_vl.train import build

    model, processor = build.build_tiny(tile_size=112, max_tiles=4, reference_comparison=True, dct=True,
                                        reference_encoders=["dct"])  # fmt: skip
    monkeypatch.delenv("KENSA_MODEL", raising=False)
    monkeypatch.setattr(build, "build_tiny", lambda **_: (model, processor))
    monkeypatch.setenv("KENSA_MAX_NEW_TOKENS", "0")
    monkeypatch.delenv("KENSA_FINE_TILES", raising=False)
    assert app.load_inspector().fine_auto  # as `kensa-vl inspect`
    monkeypatch.setenv("KENSA_FINE_TILES", "off")
    assert app.load_inspector().fine is None
    monkeypatch.setenv("KENSA_FINE_TILES", "many")
    with pytest.raises(ValueError, match="KENSA_FINE_TILES must be auto, off or a whole number of tiles, .* 'many'"):
        app.load_inspector()
    monkeypatch.setenv("KENSA_FINE_TILES", "off")
    monkeypatch.setenv("KENSA_PHASES", "3")
    with pytest.raises(ValueError, match="KENSA_PHASES must be 1 or 2, got '3'"):
        app.load_inspector()
    monkeypatch.setenv("KENSA_PHASES", "1")
    assert app.load_inspector().phase is None
    monkeypatch.delenv("KENSA_PHASES")
    paths, _ = photos
    demo = app.Demo(app.load_inspector())  # judged moved half a cell too, as `kensa-vl inspect`
    demo.run(paths[:2], [], "", "nut", [paths[3]])
    demo.run(paths[1:3], [], "", "nut", [paths[3]])
    one, two = demo.sessions.values()
    assert one.phase is not two.phase and one.phase.support != two.phase.support and one._judges_moved
    monkeypatch.setenv("KENSA_FINE_TILES", "9")
    demo = app.Demo(app.load_inspector())
    assert demo.inspector.fine.query_max_tiles == 9
    _, first, _ = demo.run(paths[:2], [], "", "nut", [paths[3]])
    demo.run(paths[1:3], [], "", "nut", [paths[3]])
    one, two = demo.sessions.values()
    assert one.fine is not two.fine and one.fine.support == one.support != two.fine.support
    alone = Inspector(model, processor, noun="nut", max_new_tokens=0, fine_tiles=9)
    alone.set_support(one.support)
    expected = alone.judge(app.open_image(paths[3], "query"))[0].p_defective
    assert one.judge(app.open_image(paths[3], "query"))[0].p_defective == pytest.approx(expected, abs=1e-6)
    assert first[0][2] == round(expected, 3)


def test_support_is_cached_and_a_bad_query_is_reported_while_the_others_are_judged(demo, photos):
    paths, broken = photos
    gallery, rows, status = demo.run(paths[:2], [paths[2]], "a dark scratch", "nut", [paths[3], broken])
    assert "encoded" in status and len(gallery) == 1
    assert rows[0][0] == "p3.png" and rows[0][1] in ("good", "defective") and 0 <= rows[0][2] <= 1
    assert rows[1][:2] == ["broken.png", "error"] and "not a readable image" in rows[1][3]
    _, again, status = demo.run(paths[:2], [paths[2]], "a dark scratch", "nut", [paths[3]])
    assert "reused from the cache" in status and again[0][2] == rows[0][2]
    _, _, status = demo.run(paths[:1], [paths[2]], "a dark scratch", "nut", [paths[3]])
    assert "encoded" in status  # another support set


def test_limits_and_bad_examples_become_messages(app, demo, photos, monkeypatch):
    paths, broken = photos
    *_, status = demo.run(paths, [], "", "nut", paths * 3)
    assert status.startswith("**Cannot inspect:**") and "queries: 12 images, at most 8" in status
    *_, status = demo.run([broken], [], "", "nut", paths[:1])
    assert "good example broken.png is not a readable image" in status
    *_, status = demo.run(paths[:1], [], "", "nut", [])
    assert "at least one query" in status
    *_, status = demo.run(paths[:2], paths[2:3], "dent@10,10,60", "nut", paths[:1])
    assert "**Cannot inspect:**" in status and "'dent@10,10,60' gives 3 numbers, not 4" in status
    *_, status = demo.run(paths[:2], paths[2:3], "dent@10,10,60,50", "nut", paths[:1])
    assert status.startswith("Support set (2 good, 1 defective)"), status
    (session,) = [i for i in demo.sessions.values() if i.support[-1]["defect_type"] == "dent"]
    assert session.support[-1]["boxes"] == [[10, 10, 60, 50]]  # the example's box, from its line
    monkeypatch.setattr(app, "MAX_PIXELS", 100 * 100)
    *_, status = demo.run(paths[:1], [], "", "bolt", paths[:1])
    assert "200x160 = 32,000 pixels, the limit is 10,000" in status
    monkeypatch.setattr(demo.inspector, "judge", lambda image: 1 / 0)
    monkeypatch.setattr(app, "MAX_PIXELS", 4096 * 4096)
    gallery, rows, status = demo.run(paths[:1], [], "", "screw", paths[:1])
    assert "Something went wrong" in status and "ZeroDivisionError" not in status and gallery == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_inspection_in_a_real_browser(photos, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no system Chromium (apt-get install chromium; .ci/run installs it)")
    paths, _ = photos
    port = _free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "KENSA_MAX_NEW_TOKENS": "8", "GRADIO_ANALYTICS_ENABLED": "0"}
    env.pop("KENSA_MODEL", None)  # the offline tiny default
    log = open(tmp_path / "app.log", "w")
    server = subprocess.Popen([sys.executable, str(ROOT / "demo" / "app.py")], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"the demo did not start: {(tmp_path / 'app.log').read_text()[-3000:]}")
                time.sleep(1)
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            page.goto(url)
            page.locator("#good input[type=file]").set_input_files(paths[:2])
            page.locator("#defective input[type=file]").set_input_files(paths[2:3])
            page.locator("#queries input[type=file]").set_input_files(paths[3:4])
            page.locator("#good").get_by_text("p1", exact=True).wait_for(timeout=60_000)  # uploads finished
            page.locator("#queries").get_by_text("p3", exact=True).wait_for(timeout=60_000)
            page.locator("#inspect").click()
            page.locator("#status").get_by_text("Support set").wait_for(timeout=120_000)
            results = page.locator("#results").inner_text()
            assert "p3.png" in results and ("good" in results or "defective" in results)
            drawn = page.locator("#gallery img").first
            drawn.wait_for(timeout=30_000)
            assert (
                drawn.evaluate("img => img.complete && img.naturalWidth") == 260
            )  # the query (p3), boxes drawn on it
            artifacts = Path(os.environ.get("KENSA_ARTIFACTS", tmp_path))
            artifacts.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(artifacts / "demo.png"), full_page=True)
            # the Grade tab: two named grades of one example each, a limit sample, a query
            page.get_by_role("tab", name="Grade").click()
            for i, (name, files) in enumerate([("light", paths[:1]), ("dark", paths[1:2])]):
                page.locator(f"#grade{i}_name").locator("textarea, input").first.fill(name)
                page.locator(f"#grade{i}_examples input[type=file]").set_input_files(files)
                page.locator(f"#grade{i}_examples").get_by_text(Path(files[0]).stem, exact=True).wait_for(
                    timeout=60_000
                )
            page.locator("#grade0_limit input[type=file]").set_input_files(paths[2:3])
            page.locator("#grade_queries input[type=file]").set_input_files(paths[3:4])
            page.locator("#grade0_limit").get_by_text("p2", exact=True).wait_for(timeout=60_000)
            page.locator("#grade_queries").get_by_text("p3", exact=True).wait_for(timeout=60_000)
            page.locator("#grade").click()
            page.locator("#grade_status").get_by_text("Graded examples").wait_for(timeout=120_000)
            graded = page.locator("#grades").inner_text()
            assert "p3.png" in graded and ("light" in graded or "dark" in graded)
            page.screenshot(path=str(artifacts / "demo_grading.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def shades(tmp_path_factory):
    """Panels of rising darkness for the Grade tab: three grades of two examples and a limit sample, three queries."""
    from tests.test_grading_model import shade

    folder = tmp_path_factory.mktemp("shades")
    levels = {"examples": [0.0, 0.1, 0.45, 0.55, 0.9, 1.0], "limits": [0.33, 0.66, None], "queries": [0.05, 0.5, 0.95]}
    paths = {}
    for kind, values in levels.items():
        for i, level in enumerate(values):
            if level is not None:
                shade(level, 50 * len(paths) + i).save(folder / f"{kind}{i}.png")
        paths[kind] = [str(folder / f"{kind}{i}.png") if v is not None else None for i, v in enumerate(values)]
    e = paths["examples"]
    rows = [["zorp", e[0:2], paths["limits"][0]], ["blick", e[2:4], paths["limits"][1]], ["一等", e[4:6], None]]
    return rows, paths["queries"]


def test_the_grade_tab_grades_caches_and_says_what_is_wrong(app, shades):
    from kensa_vl.eval.inspector import Inspector
    from kensa_vl.train.build import build_tiny

    model, processor = build_tiny(tile_size=112, max_tiles=2, reference_comparison=True, dct=True)
    demo = app.Demo(Inspector(model.eval(), processor, max_new_tokens=4))
    grades, queries = shades
    empty = [["", None, None]] * (app.GRADES - len(grades))
    rows, status = demo.grade("panel", "shade", queries, *sum(grades + empty, []))
    assert "encoded" in status and [r[1] for r in rows] == ["zorp", "blick", "一等"]
    assert rows[0][2].startswith("zorp ") and rows[0][3] == "zorp"  # probabilities, the nearest limit sample's grade
    assert "reused" in demo.grade("panel", "shade", queries[:1], *sum(grades + empty, []))[1]
    one = grades[:1] + [["", None, None]] * (app.GRADES - 1)
    assert "at least two grades" in demo.grade("panel", "shade", queries, *sum(one, []))[1]
    nameless = [["", grades[1][1], None], *grades[:1], *[["", None, None]] * (app.GRADES - 2)]
    assert "give it a name" in demo.grade("panel", "shade", queries, *sum(nameless, []))[1]
    mixed = [["a, b", *grades[0][1:]], *grades[1:], *empty]
    assert "grade name" in demo.grade("panel", "shade", queries, *sum(mixed, []))[1]


def test_support_sets_are_kept_by_key_least_recently_used_first_out(app, tiny, photos):
    from kensa_vl.eval.inspector import Inspector

    model, processor = tiny
    demo = app.Demo(Inspector(model, processor, max_new_tokens=0), cache_size=2)
    paths, _ = photos
    sets = {"a": [paths[0]], "b": [paths[1]], "c": [paths[2]]}

    def status(name):
        return demo.run(sets[name], [], "", "nut", [paths[3]])[2]

    assert ["encoded" in status(n) for n in "abac"] == [True, True, False, True]  # c evicts b, the oldest
    assert "encoded" in status("b") and "reused" in status("c")
    assert len(demo.sessions) == 2


def test_concurrent_users_with_different_support_sets_get_their_own_answers(app, tiny, photos):
    from concurrent.futures import ThreadPoolExecutor

    from kensa_vl.eval.inspector import Inspector

    model, processor = tiny
    paths, _ = photos
    users = [([paths[i]], [paths[(i + 1) % 4], paths[(i + 2) % 4]]) for i in range(4)]  # (support, queries)
    alone = [app.Demo(Inspector(model, processor, max_new_tokens=0)).run(s, [], "", "nut", q)[1] for s, q in users]
    demo = app.Demo(Inspector(model, processor, max_new_tokens=0), cache_size=2)  # fewer slots than users
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda u: demo.run(u[0], [], "", "nut", u[1])[1], users * 3))
    for rows, expected in zip(together, alone * 3, strict=True):
        assert [r[2] for r in rows] == pytest.approx([r[2] for r in expected], abs=2e-3)  # rounded to 0.001


@pytest.mark.slow
def test_the_service_holds_under_concurrent_users_over_http():
    """The load test, short: 3 users with their own support sets for a few seconds against the server on 127.0.0.1,
    with fewer cache slots than users; every answer equals the same query judged alone, none lost."""
    from benchmarks.service_load import main

    result = main(["--clients", "3", "--seconds", "8", "--cache-size", "2", "--concurrency", "2"])
    assert result["requests"] >= 3 and result["lost"] == 0 and result["mismatches"] == 0


def test_the_status_line_names_an_example_unlike_the_others(app, synth_dir, tmp_path):
    """Three good photos of one product and one of another as good examples: the other is named, numbered as
    uploaded; without it nothing is."""
    from kensa_vl.eval.inspector import Inspector
    from kensa_vl.train.build import build_tiny
    from kensa_vl.train.data.synth import load_synth

    test = load_synth(synth_dir)[0]["test"]
    first, second = "grass", "cap"  # a surface, then a product (photos of a product vary more: docs/inspection.md)
    good = [i for i, label in enumerate(test["label"]) if label == "good"]
    rows = [i for i in good if test[i]["category"] == first][:4] + [
        next(i for i in good if test[i]["category"] == second)
    ]
    paths = [str(tmp_path / f"{i}.png") for i in rows]
    for i, path in zip(rows, paths, strict=True):
        test[i]["image"].save(path)
    model, processor = build_tiny(tile_size=112, max_tiles=4, reference_comparison=True, dct=True,
                                  reference_encoders=["dct"])  # fmt: skip
    demo = app.Demo(Inspector(model, processor, max_new_tokens=0))
    *_, status = demo.run([*paths[:3], paths[4]], [], "", "product", paths[3:4])
    assert "**Check the examples:** good example 4 looks unlike the good examples" in status, status
    *_, status = demo.run(paths[:3], [], "", "product", paths[3:4])
    assert "Check the examples" not in status and "Check the queries" not in status, status
    gallery, _, status = demo.run(paths[:3], [], "", "product", paths[3:])  # the other product's photo as a query
    assert f"**Check the queries:** {Path(paths[4]).name} looks unlike the good examples" in status, status
    assert "unlike" not in gallery[0][1] and "unlike the good examples" in gallery[1][1]
