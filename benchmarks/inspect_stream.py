"""`kensa-vl inspect` over a folder of many photos: its resident memory along the run (flat in the number of photos?),
then a run stopped part-way and resumed (does it judge only the rest?).

    python -m benchmarks.inspect_stream [--photos 10000] [--side 64] [--stop-after 2000] [--model DIR]

Writes the photos (random RGB, `--side` px PNGs) to a temporary folder, runs the command in a subprocess with
`--out X.jsonl`, samples its RSS every 50 ms and prints it at each tenth of the photos; then deletes the results
after `--stop-after` lines, resumes with `--resume` and counts the photos the resumed run judged. Default model: the
tiny model of `kensa-vl tiny` (random weights).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def run(command: list[str], results: Path) -> tuple[list[tuple[int, float]], int]:
    """Run `command`, sampling its RSS (MB) against the number of result lines written; returns (samples, exit)."""
    import psutil

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watched, samples = psutil.Process(process.pid), []
    while process.poll() is None:
        try:
            rss = watched.memory_info().rss
        except psutil.Error:
            break
        done = sum(1 for _ in open(results)) if results.exists() else 0
        samples.append((done, rss / 2**20))
        time.sleep(0.05)
    return samples, process.wait()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=10_000)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--stop-after", type=int, default=2_000)
    parser.add_argument("--model", help="a KensaVL folder (default: kensa-vl tiny)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="kensa-stream-"))
    rng = np.random.default_rng(0)
    folder = work / "photos"
    folder.mkdir()
    for i in range(args.photos):
        Image.fromarray(rng.integers(0, 256, (args.side, args.side, 3), np.uint8)).save(folder / f"{i:05d}.png")
    model = args.model
    if model is None:
        model = str(work / "model")
        subprocess.run([sys.executable, "-m", "kensa_vl.train.cli", "tiny", "--out", model], check=True)
    results = work / "results.jsonl"
    command = [sys.executable, "-m", "kensa_vl.train.cli", "inspect", "--model", model, "--good",
               str(folder / "00000.png"), "--query-dir", str(folder), "--out", str(results)]  # fmt: skip
    start = time.perf_counter()
    samples, code = run(command, results)
    seconds = time.perf_counter() - start
    lines = results.read_text().splitlines()
    marks = {}
    for tenth in range(1, 11):  # the RSS when each tenth of the photos was done
        target = args.photos * tenth // 10
        marks[target] = round(max((rss for done, rss in samples if done <= target), default=0.0), 1)
    # stopped part-way: keep the first lines, resume
    results.write_text("\n".join(lines[: args.stop_after]) + "\n")
    _, resumed_code = run([*command, "--resume"], results)
    after = [json.loads(line)["file"] for line in results.read_text().splitlines()]
    out = {
        "photos": args.photos,
        "side": args.side,
        "exit": code,
        "seconds": round(seconds, 1),
        "photos_per_s": round(args.photos / seconds, 1),
        "rss_mb_when_done": marks,
        "resumed_exit": resumed_code,
        "judged_on_resume": len(after) - args.stop_after,
        "expected_on_resume": args.photos - args.stop_after,
        "duplicates": len(after) - len(set(after)),
    }
    from kensa_vl.eval.measure import machine

    out["machine"] = machine()
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
