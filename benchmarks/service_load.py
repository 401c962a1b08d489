"""Load test of the inspection service (the demo's HTTP API) on 127.0.0.1: concurrent users, each with a support set
of their own, for a fixed time; bounded in clients, seconds and queue size.

    python -m benchmarks.service_load [--model DIR] [--clients 4] [--seconds 60] [--cache-size 4] [--concurrency 2]

The server is `demo/app.py` in a subprocess (the main job's tiny settings, random weights, saved once, unless
`--model`). Every answer's P(defective) is checked against the same query judged alone in this process, with the
same weights. Prints requests, refused (the queue was full: a message, not a loss), lost (no answer), mismatches,
p50/p99 latency and the server's peak resident memory; `--json` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).parents[1]


def photos(folder: Path, user: int, count: int) -> list[str]:
    """A user's product: stripes of their own period, photographed with noise; the last has a dark spot."""
    rng = np.random.default_rng(user)
    period = 3 + user
    paths = []
    for i in range(count):
        rgb = 110 + 40 * np.sin(np.arange(224) / period)[None, :, None] + rng.normal(0, 3, (224, 224, 3))
        if i == count - 1:
            rgb[100:130, 90:120] = 20
        paths.append(str(folder / f"user{user}_{i}.png"))
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(paths[-1])
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: Path, port: int, args) -> subprocess.Popen:
    env = {**os.environ, "KENSA_MODEL": str(model), "GRADIO_SERVER_PORT": str(port), "KENSA_MAX_NEW_TOKENS": "0",
           "KENSA_CACHE_SIZE": str(args.cache_size), "KENSA_CONCURRENCY": str(args.concurrency),
           "KENSA_QUEUE_SIZE": str(args.queue_size), "GRADIO_ANALYTICS_ENABLED": "False"}  # fmt: skip
    server = subprocess.Popen([sys.executable, str(ROOT / "demo" / "app.py")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"the demo server exited: {server.stderr.read()[-2000:]}") from None
            time.sleep(1)
    server.kill()
    raise RuntimeError("the demo server did not start within 300 s")


def peak_memory(pid: int, stop: threading.Event, out: list) -> None:
    import psutil

    process, high = psutil.Process(pid), 0
    while not stop.is_set():
        try:
            high = max(high, process.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.05)
    out.append(high)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a KensaVL folder (default: the main job's tiny settings, random weights)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--queries", type=int, default=2, help="queries per request")
    parser.add_argument("--cache-size", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    from gradio_client import Client, handle_file

    from kensa_vl.eval.inspector import PHASES, Inspector, load_pretrained, support_item

    work = Path(tempfile.mkdtemp(prefix="kensa-load-"))
    model = Path(args.model) if args.model else None
    if model is None:
        from kensa_vl.train.build import build_tiny, save_kensa
        from kensa_vl.train.pipeline import TINY

        model = save_kensa(*build_tiny(**TINY), work / "model")
    users = [photos(work, u, args.queries + 2) for u in range(args.clients)]  # 2 good supports, then the queries
    # judged as the demo judges by default (KENSA_FINE_TILES and KENSA_PHASES unset)
    reference = Inspector(*load_pretrained(model), noun="tile", max_new_tokens=0, fine_tiles="auto", phases=PHASES)
    expected = []
    for paths in users:
        reference.set_support([support_item(p) for p in paths[:2]])
        expected.append([r.p_defective for r in reference.judge(paths[2:])])

    port = free_port()
    server = serve(model, port, args)
    stop, memory = threading.Event(), []
    sampler = threading.Thread(target=peak_memory, args=(server.pid, stop, memory))
    sampler.start()
    latencies, counts, lock = [], {"requests": 0, "refused": 0, "lost": 0, "mismatches": 0}, threading.Lock()

    def user(index: int) -> None:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        good = [handle_file(p) for p in users[index][:2]]
        queries = [handle_file(p) for p in users[index][2:]]
        end = time.time() + args.seconds
        while time.time() < end:
            start = time.perf_counter()
            try:
                _, table, status = client.predict(good, [], "", "tile", queries, api_name="/run")
            except Exception as err:  # noqa: BLE001 - a full queue is refused with a message; anything else is lost
                with lock:
                    counts["refused" if "queue" in str(err).lower() else "lost"] += 1
                continue
            seconds = time.perf_counter() - start
            answers = [row[2] for row in table["data"]]
            same = len(answers) == len(expected[index]) and np.allclose(answers, expected[index], atol=2e-3)
            with lock:
                counts["requests"] += 1
                counts["mismatches"] += not same
                latencies.append(seconds)

    try:
        threads = [threading.Thread(target=user, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()
        sampler.join()
        server.terminate()
        server.wait(30)
    result = {
        **counts,
        "clients": args.clients,
        "seconds": args.seconds,
        "queries_per_request": args.queries,
        "cache_size": args.cache_size,
        "concurrency": args.concurrency,
        "p50_s": statistics.median(latencies) if latencies else None,
        "p99_s": float(np.percentile(latencies, 99)) if latencies else None,
        "server_peak_rss_mb": round(memory[0] / 2**20) if memory else None,
    }
    from kensa_vl.eval.measure import machine

    result["machine"] = machine()
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
