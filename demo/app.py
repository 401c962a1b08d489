"""KensaVL few-shot inspection demo (Gradio; also the Hugging Face Space).

    KENSA_MODEL=outputs/main/model python demo/app.py      # a local folder, or a Hub id (trust_remote_code)
    python demo/app.py                                     # neither: the offline tiny default (random weights)

Upload good examples, defective examples (one name per line, in your words, optional), and queries; press Inspect.
Each query gets its verdict, P(defective), the description, which defective example it resembles ("like defective
example 2: a dark scratch"), its heatmap and boxes drawn, and the time it took. The Grade tab grades queries against
examples of 2-4 named grades, each with an optional limit sample (官能検査): each query gets its grade, the
probability of each grade and the nearest limit sample. Each
support set is encoded once and kept (KV cache) by key for the next request with it; as `kensa-vl inspect`, photos
2x or more larger per side than the model compares at are judged again at 4x the tiles, at most 16
(KENSA_FINE_TILES: auto, the default; off; or N, always at up to N tiles; about 3.5x the time), and each query
is judged with it and its examples moved half a compared cell too (KENSA_PHASES: 2, the default, or 1); the last
KENSA_CACHE_SIZE (4)
are held, KENSA_CONCURRENCY (2) requests run at once and KENSA_QUEUE_SIZE (16) wait, beyond that a request is
refused with a message. Bad input gets a message in the page, never a traceback.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import threading
import time
from argparse import ArgumentTypeError
from collections import OrderedDict
from pathlib import Path

import gradio as gr
from PIL import Image

from kensa_vl.eval.inspect_command import fine_tiles_setting, split_box
from kensa_vl.eval.inspector import PHASE_CHOICES, PHASES, Inspector, load_pretrained, support_item
from kensa_vl.eval.plots import draw_judgement
from kensa_vl.processing.image_processing_kensa_vl import ImageTooLarge, to_rgb

logger = logging.getLogger("kensa_vl.demo")

LIMITS = {"good": 8, "defective": 4, "queries": 8, "per grade": 4}
GRADES = 4  # grade rows on the Grade tab
MAX_FILE_MB = 10
MAX_PIXELS = 4096 * 4096


def load_inspector() -> Inspector:
    """The model named by KENSA_MODEL (folder or Hub id), else the tiny offline default of the main job."""
    fine = os.environ.get("KENSA_FINE_TILES", "auto")  # photos far larger than compared (docs/inspection.md)
    try:
        fine_tiles = fine_tiles_setting(fine.strip())
    except ArgumentTypeError as err:
        expected = "auto, off or a whole number of tiles, such as 16"
        raise ValueError(f"KENSA_FINE_TILES must be {expected}, got {fine!r}") from err
    source = os.environ.get("KENSA_MODEL")
    if source:
        model, processor = load_pretrained(source)
    else:
        from kensa_vl.train.build import build_tiny
        from kensa_vl.train.pipeline import TINY

        model, processor = build_tiny(**TINY)
    tokens = int(os.environ.get("KENSA_MAX_NEW_TOKENS", "48"))
    phases = os.environ.get("KENSA_PHASES", str(PHASES)).strip()  # each photo moved half a cell too (2)
    if phases not in {str(choice) for choice in PHASE_CHOICES}:
        raise ValueError(f"KENSA_PHASES must be {' or '.join(map(str, PHASE_CHOICES))}, got {phases!r}")
    return Inspector(model, processor, max_new_tokens=tokens, fine_tiles=fine_tiles, phases=int(phases))


def open_image(path: str, role: str) -> Image.Image:
    """The image at `path`, or a ValueError that says which file and what is wrong with it."""
    name = Path(path).name
    size_mb = Path(path).stat().st_size / 2**20
    if size_mb > MAX_FILE_MB:
        raise ValueError(f"{role} {name}: {size_mb:.1f} MB, the limit is {MAX_FILE_MB} MB per file")
    try:
        return to_rgb(path, MAX_PIXELS)  # the pixel limit is read from the header, before decoding
    except ImageTooLarge as err:
        pixels = err.width * err.height
        limit = f"the limit is {MAX_PIXELS:,}"
        raise ValueError(f"{role} {name}: {err.width}x{err.height} = {pixels:,} pixels, {limit}") from err
    except ValueError as err:
        raise ValueError(f"{role} {name} is not a readable image") from err


def unlike_note(unlike: list[tuple[int, float]], good: int) -> str:
    """The status line's warning for the examples that look unlike the good ones (`Inspector.unlike`), numbered as
    uploaded."""
    named = [f"good example {n}" if n <= good else f"defective example {n - good}" for n, _ in unlike]
    if not named:
        return ""
    far = ", ".join(f"{math.exp(e):.1f}x" for _, e in unlike)
    verb = "looks" if len(named) == 1 else "look"
    return (
        f" **Check the examples:** {' and '.join(named)} {verb} unlike the good examples (cells {far} as far from "
        "them as theirs from each other): another product, another zoom, or a wrong file?"
    )


def unlike_query_note(names: list[str]) -> str:
    """The status line's warning for the queries that look unlike the good examples (`Judgement.unlike`)."""
    if not names:
        return ""
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    verb = "looks" if len(names) == 1 else "look"
    return f" **Check the queries:** {shown} {verb} unlike the good examples: another product or another zoom?"


def check_counts(**files) -> None:
    for role, paths in files.items():
        if len(paths) > LIMITS[role]:
            raise ValueError(f"{role}: {len(paths)} images, at most {LIMITS[role]}")
    if not files["queries"]:
        raise ValueError("upload at least one query image")


class Demo:
    """The page's state: the support sets of recent users, each in its own inspector over the one shared model, kept
    by key (the photos' bytes, the descriptions, the noun) and bounded: the least recently used is dropped when a
    new one comes and `cache_size` are held. Concurrent requests never share a support set's state."""

    def __init__(self, inspector: Inspector, cache_size: int = 4):
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}")
        self.inspector, self.cache_size = inspector, cache_size
        self.sessions: OrderedDict[str, Inspector] = OrderedDict()
        self.encoding: dict[str, threading.Lock] = {}
        self.lock = threading.Lock()

    def set_support(self, good: list[str], defective: list[str], descriptions: str, noun: str):
        """The inspector holding this support set, encoded unless it is cached: `(inspector, encoded)`."""
        notes = [line.strip() for line in (descriptions or "").splitlines()]

        def make() -> list[dict]:
            support = [support_item(open_image(p, "good example")) for p in good]
            for i, path in enumerate(defective):
                note, box = split_box(notes[i]) if i < len(notes) else ("", None)
                image = open_image(path, "defective example")
                support.append(support_item(image, defective=True, description=note.strip() or None,
                                            boxes=[box] if box else None))  # fmt: skip
            return support

        return self.session([*good, *defective], ["\n".join(notes), noun], make, noun=noun.strip() or "product")

    def session(self, paths: list[str], words: list[str], make, **settings):
        """The inspector holding the support set of `paths` (photos) and `words` (names, settings), built by `make()`
        and encoded unless it is cached, with `settings` set on it: `(inspector, encoded)`."""
        digest = hashlib.sha256("\x00".join(words).encode())
        for path in paths:
            digest.update(Path(path).read_bytes())
        key = digest.hexdigest()
        with self.lock:
            if key in self.sessions:
                self.sessions.move_to_end(key)
                return self.sessions[key], False
            gate = self.encoding.setdefault(key, threading.Lock())
        with gate:  # one encoding per key; a second request for it waits and then finds it cached
            with self.lock:
                if key in self.sessions:
                    return self.sessions[key], False
            support = make()
            session = copy.copy(self.inspector)  # shares the model; its own support state
            for name, value in settings.items():
                setattr(session, name, value)
            session.set_support(support)
            with self.lock:
                self.sessions[key] = session
                while len(self.sessions) > self.cache_size:
                    self.sessions.popitem(last=False)
                self.encoding.pop(key, None)
            return session, True

    def run(self, good, defective, descriptions, noun, queries):
        """The button: (gallery of drawn queries, results table, status line). Never raises."""
        good, defective, queries = good or [], defective or [], queries or []
        try:
            check_counts(good=good, defective=defective, queries=queries)
            start = time.perf_counter()
            inspector, encoded = self.set_support(good, defective, descriptions, noun)
            support_ms = (time.perf_counter() - start) * 1000
            gallery, rows, unlike_queries = [], [], []
            for path in queries:
                start = time.perf_counter()
                try:
                    image = open_image(path, "query")
                    result = inspector.judge(image)[0]
                except ValueError as err:  # one bad query: say which, judge the others
                    rows.append([Path(path).name, "error", None, str(err), "", None])
                    continue
                ms = (time.perf_counter() - start) * 1000
                # which defective example it resembles, numbered as uploaded, and the pointer's share on it
                like = "" if result.example is None or result.verdict != "defective" else (
                    f"defective example {result.example - len(good)}: {result.example_name} "
                    f"({result.example_share:.2f})"
                )  # fmt: skip
                caption = f"{Path(path).name}: {result.verdict} (P(defective) {result.p_defective:.2f})"
                caption += f", like {like}" if like else ""
                if result.unlike is not None:  # another product or zoom (`Inspector._query_check`)
                    caption += f", unlike the good examples ({math.exp(result.unlike):.1f}x as far)"
                    unlike_queries.append(Path(path).name)
                # the heatmap (where the query differs from the good examples) under the boxes, when the model compares
                gallery.append((draw_judgement(image, result.boxes, result.verdict, result.heatmap), caption))
                row = [Path(path).name, result.verdict, round(result.p_defective, 3), result.text, like, round(ms)]
                rows.append(row)
            cached = "encoded" if encoded else "reused from the cache"
            status = f"Support set ({len(good)} good, {len(defective)} defective) {cached} in {support_ms:.0f} ms."
            return gallery, rows, status + unlike_note(inspector.unlike, len(good)) + unlike_query_note(unlike_queries)
        except ValueError as err:
            return [], [], f"**Cannot inspect:** {err}"
        except Exception:  # the page gets a message, the log gets the traceback
            logger.exception("inspection failed")
            return [], [], "**Something went wrong** while inspecting; the server log has the details."

    def grade(self, noun, graded_by, queries, *rows):
        """The Grade button: `rows` are GRADES (name, example files, limit sample file) triples; returns (results
        table, status line). Never raises."""
        queries = queries or []
        try:
            grades = [(str(n).strip(), list(e or []), lim) for n, e, lim in zip(*[iter(rows)] * 3, strict=True)]
            grades = [g for g in grades if g[0] or g[1] or g[2]]
            for name, examples, limit in grades:
                if not name or not (examples or limit):
                    raise ValueError(f"grade {name or '(no name)'!r}: give it a name and at least one example")
                if len(examples) > LIMITS["per grade"]:
                    raise ValueError(f"grade {name!r}: {len(examples)} examples, at most {LIMITS['per grade']}")
            if len(grades) < 2:
                raise ValueError(
                    f"grading needs at least two grades, each with a name and examples; got {len(grades)}"
                )
            check_counts(queries=queries)

            def make() -> list[dict]:
                support = []
                for name, examples, limit in grades:
                    support += [support_item(open_image(p, f"example of {name}"), label=name) for p in examples]
                    if limit:
                        support.append(
                            support_item(open_image(limit, f"limit sample of {name}"), label=name, limit=True)
                        )
                return support

            paths = [p for _, examples, limit in grades for p in [*examples, *([limit] if limit else [])]]
            words = [noun, graded_by, *(f"{n}:{len(e)}:{bool(lim)}" for n, e, lim in grades)]
            start = time.perf_counter()
            inspector, encoded = self.session(paths, words, make, noun=noun.strip() or "product",
                                              graded_by=graded_by.strip() or "appearance")  # fmt: skip
            support_ms = (time.perf_counter() - start) * 1000
            rows = []
            for path in queries:
                start = time.perf_counter()
                try:
                    result = inspector.judge(open_image(path, "query"))[0]
                except ValueError as err:
                    rows.append([Path(path).name, "error", str(err), "", None])
                    continue
                shares = ", ".join(f"{g} {p:.2f}" for g, p in result.grade_probabilities.items())
                limit = "" if result.limit_sample is None else f"{inspector.support[result.limit_sample - 1]['grade']}"
                rows.append(
                    [Path(path).name, result.grade, shares, limit, round((time.perf_counter() - start) * 1000)]
                )
            cached = "encoded" if encoded else "reused from the cache"
            return (
                rows,
                f"Graded examples ({len(grades)} grades, {len(paths)} photos) {cached} in {support_ms:.0f} ms.",
            )
        except ValueError as err:
            return [], f"**Cannot grade:** {err}"
        except Exception:
            logger.exception("grading failed")
            return [], "**Something went wrong** while grading; the server log has the details."


def build(demo: Demo) -> gr.Blocks:
    with gr.Blocks(title="KensaVL few-shot inspection") as page:
        gr.Markdown(
            "# KensaVL: few-shot visual inspection\nShow a few good (and optionally defective) examples, then "
            f"judge new products; or grade them against examples of named grades. Limits: {LIMITS['good']} good, "
            f"{LIMITS['defective']} defective, {LIMITS['per grade']} per grade and {LIMITS['queries']} query "
            f"images, {MAX_FILE_MB} MB and {MAX_PIXELS // 2**20} megapixels per image."
        )
        with gr.Tab("Inspect"):
            with gr.Row():
                good = gr.File(label="Good examples", file_count="multiple", file_types=["image"], elem_id="good")
                defective = gr.File(
                    label="Defective examples", file_count="multiple", file_types=["image"], elem_id="defective"
                )
                descriptions = gr.Textbox(
                    label="Defect names, one per line (what an answer that resembles the example says); "
                    "'name@x0,y0,x1,y1' marks where the example's defect is", lines=3,
                    elem_id="descriptions",
                )  # fmt: skip
            with gr.Row():
                noun = gr.Textbox(label="Product", value="product", elem_id="noun")
                queries = gr.File(label="Queries", file_count="multiple", file_types=["image"], elem_id="queries")
            button = gr.Button("Inspect", variant="primary", elem_id="inspect")
            status = gr.Markdown(elem_id="status")
            gallery = gr.Gallery(label="Queries with heatmaps and boxes", elem_id="gallery", columns=4)
            table = gr.Dataframe(
                headers=["file", "verdict", "P(defective)", "description", "like", "ms"],
                elem_id="results",
                interactive=False,
            )
            button.click(demo.run, [good, defective, descriptions, noun, queries], [gallery, table, status])
        with gr.Tab("Grade"):
            gr.Markdown("Examples of each grade, least changed first or in any order, and optionally its limit "
                        "sample (限度見本: the most that grade allows).")  # fmt: skip
            rows = []
            for i in range(GRADES):
                with gr.Row():
                    rows += [
                        gr.Textbox(label=f"Grade {i + 1} name", elem_id=f"grade{i}_name"),
                        gr.File(label="Examples", file_count="multiple", file_types=["image"],
                                elem_id=f"grade{i}_examples"),
                        gr.File(label="Limit sample", file_types=["image"], elem_id=f"grade{i}_limit"),
                    ]  # fmt: skip
            with gr.Row():
                grade_noun = gr.Textbox(label="Product", value="product", elem_id="grade_noun")
                graded_by = gr.Textbox(label="Graded by", value="appearance", elem_id="graded_by")
                grade_queries = gr.File(label="Queries", file_count="multiple", file_types=["image"],
                                        elem_id="grade_queries")  # fmt: skip
            grade_button = gr.Button("Grade", variant="primary", elem_id="grade")
            grade_status = gr.Markdown(elem_id="grade_status")
            grades = gr.Dataframe(
                headers=["file", "grade", "probabilities", "nearest limit sample", "ms"],
                elem_id="grades",
                interactive=False,
            )
            grade_button.click(demo.grade, [grade_noun, graded_by, grade_queries, *rows], [grades, grade_status])
    return page


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    page = build(Demo(load_inspector(), cache_size=int(os.environ.get("KENSA_CACHE_SIZE", "4"))))
    # concurrent requests run on the shared model; beyond the queue's size a request is refused with a message
    page.queue(
        default_concurrency_limit=int(os.environ.get("KENSA_CONCURRENCY", "2")),
        max_size=int(os.environ.get("KENSA_QUEUE_SIZE", "16")),
    ).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
    )
