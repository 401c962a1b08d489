"""`kensa-vl inspect`: judge photos against a few good (and defective) examples, as an inspection line would.

    kensa-vl inspect --model DIR --good a.png b.png --defective c.png="a dark scratch" --query q1.png 'lot7/*.png'
    kensa-vl inspect --model DIR --good a.png b.png --defective c.png="打痕@40,60,90,70" --query q1.png  # its box
    kensa-vl inspect --model DIR --good a.png b.png --query-dir photos/ --out results.jsonl [--resume]
    kensa-vl inspect --model DIR --data mvtec_ad/bottle --shots 4 --viz outputs/viz --out results.json
    kensa-vl inspect --model DIR --class A=a1.png,a2.png --class B=b1.png --limit A=a_limit.png \
        --graded-by "colour shade" --query q1.png     # grading: grade, per-grade probabilities, nearest limit sample

Photos are read and judged one at a time, so memory stays flat in their number. With `--out X.jsonl` each result is
appended to X.jsonl and to X.csv (for a spreadsheet) as it is made; `--resume` skips the photos X.jsonl already
holds, so a stopped run judges only the rest. `--out X.json` writes one JSON list at the end. An unreadable photo is
one `error` record naming the file and the reason; the others are judged and the exit status says some failed.
Under `accelerate launch` each process judges its share and the main process writes them all, in order, at the end.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import sys
from pathlib import Path

from .inspector import PHASE_CHOICES, PHASES
from .layouts import IMAGE_SUFFIXES

FINE_TILES_HELP = (
    "auto (the default): for photos at least twice as large per side as the model compares at, also judge each one "
    "with every photo cut into 4x the tiles, at most 16 (16 for the tiny model), and take the mean P(defective), at "
    "about 3.5x the time; N: always, at up to N tiles; off: never (docs/real-surfaces.md)"
)
PHASES_HELP = (
    "2 (the default): also judge each photo with it and its examples moved half a compared cell, and take the mean "
    "P(defective), at twice the time; 1: the photos as they are (docs/real-surfaces.md)"
)


def add_looks(parser, note: str = "") -> None:
    """The `--fine-tiles` and `--phases` options of `kensa-vl inspect` and `eval`: how many looks each query gets
    (`note`: added to their help)."""
    parser.add_argument("--fine-tiles", type=fine_tiles_setting, default="auto", metavar="auto|N|off",
                        help=FINE_TILES_HELP + note)  # fmt: skip
    parser.add_argument("--phases", type=int, choices=PHASE_CHOICES, default=PHASES, help=PHASES_HELP + note)


def fine_tiles_setting(text: str) -> int | str | None:
    """`--fine-tiles`: "auto", "off" (None) or a whole number of tiles (`Inspector`'s `fine_tiles`)."""
    if text in ("auto", "off"):
        return None if text == "off" else "auto"
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"takes auto, off or a whole number of tiles >= 1, got {text!r}")
    return int(text)


CSV_FIELDS = ("file", "category", "verdict", "p_defective", "defect_type", "position", "boxes", "example",
              "example_name", "example_share", "grade", "grade_probabilities", "limit_sample", "unlike",
              "text")  # fmt: skip


def query_files(args) -> list[str]:
    """The query photos: `--query` paths or globs, `--query-dir` (images at any depth, sorted), `--query-list` (a
    file with one path per line)."""
    files = []
    for pattern in args.query:
        matched = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matched:
            raise ValueError(f"--query {pattern!r} matches no file")
        files += matched
    for folder in args.query_dir:
        if not Path(folder).is_dir():
            raise ValueError(f"--query-dir {folder}: no such folder")
        found = sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ValueError(f"--query-dir {folder} holds no photos ({', '.join(sorted(IMAGE_SUFFIXES))}, any depth)")
        files += found
    if args.query_list:
        listed = [line.strip() for line in Path(args.query_list).read_text().splitlines() if line.strip()]
        if not listed:
            raise ValueError(f"--query-list {args.query_list} lists no photo (one path per line)")
        files += listed
    return files


def split_box(text: str) -> tuple[str, list[int] | None]:
    """`WORDS[@X0,Y0,X1,Y1]` -> (the words, the box in pixels or None): a defective example's box, as the command
    line and the demo take it. A tail after the last '@' that is not numbers is part of the words."""
    head, at, tail = text.rpartition("@")
    if not at or not tail.replace(",", "").replace(" ", "").isdigit():
        return text, None
    box = [int(v) for v in tail.split(",") if v.strip()]
    if len(box) != 4:
        raise ValueError(f"a defective example's box is @X0,Y0,X1,Y1; {text!r} gives {len(box)} numbers, not 4")
    return head, box


def defective_example(spec: str) -> dict:
    """`--defective IMAGE[=NAME][@X0,Y0,X1,Y1]`: a defective example, its name, and the box of its defect in its
    pixels (the example's defect is then looked for there, docs/naming-by-example.md)."""
    from .inspector import support_item

    spec, box = split_box(spec)
    path, _, description = spec.partition("=")
    return support_item(path, defective=True, description=description or None, boxes=[box] if box else None)


def jobs(args) -> list[tuple[str, list[dict], list[str]]]:
    """(noun, support set, query files) per category: from `--good/--defective` and the queries, or from a dataset
    folder (`--data`: each category's `--shots` supports by the evaluation's protocol, and every query photo)."""
    from .evaluate import pools, support_for
    from .inspector import support_item
    from .layouts import Collection, load

    if not args.data:
        queries = query_files(args)
        if not queries:
            raise ValueError("inspect needs --query IMAGE..., --query-dir DIR, --query-list FILE or --data DIR")
        if (args.classes or args.limit) and (args.good or args.defective):
            raise ValueError("--class/--limit (grading) and --good/--defective (inspection) do not mix: pick one")
        support = [support_item(path) for path in args.good]
        support += [defective_example(spec) for spec in args.defective]
        for spec, limit in [(c, False) for c in args.classes] + [(c, True) for c in args.limit]:
            grade, _, paths = spec.partition("=")
            if not grade.strip() or not paths:
                raise ValueError(f"--class and --limit take GRADE=IMAGE[,IMAGE...], got {spec!r}")
            support += [support_item(path, label=grade, limit=limit) for path in paths.split(",")]
        return [(args.noun, support, queries)]
    items = load(args.data)
    if not isinstance(items, Collection):
        raise ValueError(f"inspect --data reads photo folders (MVTec, VisA, folder), not KensaSynth: {args.data}")
    out, rows = [], pools(items)
    for category in sorted(rows):
        good, _ = support_for(rows, category, args.shots, 0, args.seed)
        queries = [i for label in ("good", "defective") for i in rows[category][label] if i not in good]
        support = [support_item(items.photos[i].path) for i in good]
        out.append((category, support, [str(items.photos[i].path) for i in queries]))
    return out


class Sink:
    """Where results go as they are made: `X.jsonl` and `X.csv` appended line by line (`--resume` reads what
    `X.jsonl` holds and skips it), or `X.json` written once at the end, or nowhere."""

    def __init__(self, out: str | None, resume: bool):
        self.path = Path(out) if out else None
        self.streaming = self.path is not None and self.path.suffix == ".jsonl"
        self.done, self.kept = set(), []
        if resume and not self.streaming:
            raise ValueError("--resume needs --out X.jsonl (results written as they are made)")
        if self.streaming:
            if self.path.exists() and not resume:
                raise FileExistsError(f"{self.path} exists: pass --resume to judge only the photos it lacks")
            if resume and self.path.exists():
                self.done = {json.loads(line)["file"] for line in self.path.read_text().splitlines() if line.strip()}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            table = self.path.with_suffix(".csv")
            new_table = not table.exists() or not resume
            self._lines = open(self.path, "a")
            self._table = open(table, "a" if resume else "w", newline="")
            self._csv = csv.DictWriter(self._table, fieldnames=CSV_FIELDS, extrasaction="ignore")
            if new_table:
                self._csv.writeheader()

    def add(self, record: dict) -> None:
        if not self.streaming:
            self.kept.append(record)
            return
        self._lines.write(json.dumps(record) + "\n")
        self._csv.writerow(
            {
                **record,
                "boxes": json.dumps(record["boxes"]),
                "grade_probabilities": json.dumps(record.get("grade_probabilities"), ensure_ascii=False),
            }
        )
        self._lines.flush()  # a stopped run keeps every finished photo
        self._table.flush()

    def close(self) -> None:
        if self.streaming:
            self._lines.close()
            self._table.close()
        elif self.path is not None:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps(self.kept, indent=2))
            tmp.replace(self.path)


def run(args) -> None:
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .inspector import Inspector, load_pretrained

    work = jobs(args)
    state = PartialState()
    settings = {} if args.coreset is None else {"reference_coreset": args.coreset}
    model, processor = load_pretrained(args.model, **settings)  # a broken folder is refused before a file is written
    sink = Sink(args.out if state.is_main_process else None, args.resume)
    inspector = Inspector(model, processor, threshold=args.threshold, support_max_tiles=args.support_tiles,
                          graded_by=args.graded_by, fine_tiles=args.fine_tiles, phases=args.phases)  # fmt: skip
    total = sum(len(q) for *_, q in work)
    bar = tqdm(total=total, unit="photo", desc="inspecting", disable=not state.is_main_process)
    failed, gathered = [], []
    for job, (noun, support, queries) in enumerate(work):
        todo = [(i, q) for i, q in enumerate(queries) if q not in sink.done]
        bar.update(len(queries) - len(todo))
        if not todo:
            continue
        inspector.noun = noun
        # a warning about an example or a query unlike the good examples (`Inspector.unlike`) on its own line
        with logging_redirect_tqdm(), state.split_between_processes(todo) as mine:
            inspector.set_support(support)
            for order, path in mine:
                record = judge(inspector, path, noun, args)
                if state.num_processes > 1:
                    gathered.append({**record, "order": (job, order)})
                else:
                    emit(record, sink, failed)
                bar.update(state.num_processes)
    bar.close()
    if state.num_processes > 1:
        for record in sorted(gather_object(gathered), key=lambda r: r.pop("order")):
            if state.is_main_process:
                emit(record, sink, failed)
    sink.close()
    if failed:
        raise ValueError(f"{len(failed)} of {total} queries could not be read: {', '.join(failed[:20])}")


def judge(inspector, path: str, noun: str, args) -> dict:
    """One photo's record (and its `--viz` picture)."""
    result = inspector.judge([path])[0]
    if args.viz and result.verdict != "error":
        name = f"{noun}_{Path(path).parent.name}_{Path(path).stem}" if args.data else Path(path).stem
        draw(path, result, Path(args.viz) / f"{name}.png")
    record = {"file": path, "category": noun, **result.to_dict()}
    if result.verdict == "error" or result.grade is not None:
        record["p_defective"] = None  # JSON has no NaN
    return record


def emit(record: dict, sink: Sink, failed: list) -> None:
    from tqdm.auto import tqdm

    if record["verdict"] == "error":
        failed.append(record["file"])
        line = f"{record['file']}\terror\t{record['text']}"
    elif record.get("grade") is not None:
        shares = " ".join(f"{g}={p:.2f}" for g, p in record["grade_probabilities"].items())
        limit = f"\tnearest limit sample: example {record['limit_sample']}" if record.get("limit_sample") else ""
        line = f"{record['file']}\t{record['grade']}\t{shares}{limit}"
    else:
        shown = record.get("example") and record["verdict"] == "defective"  # a good photo resembles no defect
        like = f"\tlike example {record['example']}: {record['example_name']}" if shown else ""
        if record.get("unlike"):  # `Inspector._query_check`
            like += f"\tunlike the good examples ({math.exp(record['unlike']):.1f}x as far): another product or zoom?"
        line = f"{record['file']}\t{record['verdict']}\t{record['p_defective']:.3f}{like}"
    tqdm.write(line)  # above the progress bar, which stays on the terminal's last line
    sys.stdout.flush()  # a line per photo as it is judged, also into a pipe
    sink.add(record)


def draw(path: str, result, out: Path) -> None:
    """The query with its heatmap (when the model compares), boxes and verdict, as a PNG."""
    from kensa_vl.processing.image_processing_kensa_vl import to_rgb

    from .plots import draw_judgement

    out.parent.mkdir(parents=True, exist_ok=True)
    draw_judgement(to_rgb(path), result.boxes, result.verdict, result.heatmap).save(out)


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("inspect")  # its --help line: cli.COMMANDS
    p.add_argument("--model", required=True)
    p.add_argument("--good", nargs="+", default=[], metavar="IMAGE")
    p.add_argument(
        "--defective", nargs="*", default=[], metavar="IMAGE[=NAME][@X0,Y0,X1,Y1]",
        help="defective examples, each with the name an answer that resembles it copies ('a dark scratch', '打痕') "
        "and optionally the box of its defect in its pixels ('d.png=打痕@40,60,90,70')",
    )  # fmt: skip
    p.add_argument(
        "--class", dest="classes", action="append", default=[], metavar="GRADE=IMAGE[,IMAGE...]",
        help="grading: examples of one grade (repeat per grade: --class A=a1.png,a2.png --class B=b1.png)",
    )  # fmt: skip
    p.add_argument("--limit", action="append", default=[], metavar="GRADE=IMAGE[,IMAGE...]",
                   help="grading: a grade's limit samples (限度見本: the most that grade allows)")  # fmt: skip
    p.add_argument("--graded-by", default="appearance", help="grading: what the grades are of ('colour shade')")
    p.add_argument("--query", nargs="+", default=[], metavar="IMAGE", help="photos or globs ('lot7/*.png')")
    p.add_argument("--query-dir", nargs="+", default=[], metavar="DIR", help="every photo under these folders")
    p.add_argument("--query-list", metavar="FILE", help="a file with one photo path per line")
    p.add_argument("--data", help="a photo folder (MVTec AD, LOCO, VisA, good/defective): supports and queries")
    p.add_argument("--shots", type=int, default=4, help="with --data: good supports per category")
    p.add_argument("--seed", type=int, default=0, help="with --data: which support draw")
    p.add_argument("--noun", default="product", help="what the product is called in the prompt")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument(
        "--support-tiles",
        type=int,
        default=None,
        help="tiles per support photo the language model reads (default: as many as a query's); the comparison "
        "still holds every tile of every support",
    )
    add_looks(p)
    p.add_argument(
        "--coreset",
        type=float,
        default=None,
        help="keep this share of each support's cells in the comparison's bank (a greedy k-center coreset): faster "
        "queries against a fixed support set, at a small cost in accuracy (docs/reference-comparison.md)",
    )
    p.add_argument("--out", help="X.jsonl (and X.csv), written as results are made; or X.json, written at the end")
    p.add_argument("--resume", action="store_true", help="with --out X.jsonl: skip the photos it already holds")
    p.add_argument("--viz", help="folder for each query with its heatmap and boxes drawn")
    p.set_defaults(func=run)
