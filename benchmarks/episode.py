"""One few-shot episode side by side: KensaVL against LLaVA-NeXT, Idefics3 and InternVL from transformers, all at
the same vision-encoder and language-model size (`benchmarks/peers.py`), random weights, in one process.

    python -m benchmarks.episode [--shots 4] [--size 1344] [--repeats 3] [--train] [--only ROW ...] [--turns N]

Per model: visual tokens and sequence length of the prompt (k support photos and a query, all `--size` square),
forward time and peak memory (inference, no gradients),
and with `--train` a training step (forward + backward of the LM loss on the whole prompt) with its peak memory.
The Inspector row runs the episode as `kensa-vl inspect` does (`Inspector.set_support` + one query, scores only; its
"forward" is that whole episode, "query alone" a further query against the cached support set). Ratios are each
row's forward time over LLaVA-NeXT's.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from benchmarks.peers import build, tokenizer_with_peer_tokens
from kensa_vl.eval.inspector import Inspector, support_item
from kensa_vl.eval.measure import PeakMemory, machine, timed


def photos(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def variants() -> dict[str, tuple[str, dict, dict]]:
    """Row label -> (model name, `build` extras, input extras)."""
    return {
        "KensaVL (default)": ("KensaVL", {}, {}),
        "KensaVL, supports ≤ 4 tiles": ("KensaVL", {}, {"support_tiles": 4}),
        "KensaVL + reference comparison (DCT)": ("KensaVL", {"dct": True}, {}),
        "KensaVL + comparison, Inspector: supports read at 1 tile, bank in full": (
            "KensaVL",
            {"dct": True},
            {"support_tiles": 1, "inspector": True},
        ),
        "LLaVA-NeXT": ("LLaVA-NeXT", {}, {}),
        "Idefics3": ("Idefics3", {}, {}),
        "InternVL": ("InternVL", {}, {}),
    }


def inspector_episode(model, processor, images: list, support_tiles: int):
    """(the Inspector, the episode as `kensa-vl inspect` runs it): `Inspector.set_support` (the language model reads
    the supports at `support_tiles`, the comparison's bank holds every tile, `support_bank`) and the last image
    judged (scores only)."""
    inspector = Inspector(model.eval(), processor, max_new_tokens=0, support_max_tiles=support_tiles)
    support = [support_item(image) for image in images[:-1]]

    def episode():
        inspector.set_support(support)
        inspector.judge(images[-1])

    return inspector, episode


def measure_inspector(built, images, repeats: int, support_tiles: int) -> dict:
    inspector, episode = inspector_episode(built.model, built.processor, images, support_tiles)
    out = {"visual tokens": "n/a", "sequence": "n/a", "forward s": timed(episode, repeats)}
    with PeakMemory() as memory:
        episode()
    out["forward MiB"] = memory.peak / 2**20
    out["query alone s"] = timed(lambda: inspector.judge(images[-1]), repeats)
    return out


def measure(built, images, repeats: int, train: bool, support_tiles: int | None = None, inspector=False) -> dict:
    if inspector:
        return measure_inspector(built, images, repeats, support_tiles)
    tiles = [support_tiles] * (len(images) - 1) + [12] if support_tiles else None
    inputs = built.inputs(images, tiles)
    model = built.model.eval()
    image_id = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    out = {
        "visual tokens": int((inputs["input_ids"] == image_id).sum()),
        "sequence": inputs["input_ids"].shape[1],
    }
    with torch.no_grad():
        out["forward s"] = timed(lambda: model(**inputs), repeats)
        with PeakMemory() as memory:
            model(**inputs)
    out["forward MiB"] = memory.peak / 2**20
    if train:
        model.train()
        labels = inputs["input_ids"].clone()

        def step():
            model(**inputs, labels=labels).loss.backward()
            model.zero_grad(set_to_none=True)

        out["train step s"] = timed(step, repeats)
        with PeakMemory() as memory:
            step()
        out["train step MiB"] = memory.peak / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--size", type=int, default=1344)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--only", nargs="*", help="row labels to run (default: all)")
    parser.add_argument(
        "--turns", type=int, default=1, help="measure the rows in turn this many times (a busy machine's speed drifts)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer, images = tokenizer_with_peer_tokens(), photos(args.shots + 1, args.size)
    chosen = {label: v for label, v in variants().items() if not args.only or label in args.only}
    turns = []
    for _ in tqdm(range(args.turns), desc="turns", disable=args.turns == 1):
        turn = {}
        for label, (name, config, extra) in tqdm(chosen.items(), desc="models"):
            built = build(name, tokenizer, **config)
            turn[label] = measure(built, images, args.repeats, args.train, **extra)
            del built
        turns.append(turn)
    # per row, the median over turns; the ratio to LLaVA-NeXT is taken within each turn, then its median
    results = {
        label: {
            k: statistics.median(t[label][k] for t in turns) if isinstance(v, float) else v
            for k, v in turns[0][label].items()
        }
        for label in chosen
    }
    ratios = {
        label: statistics.median(t[label]["forward s"] / t["LLaVA-NeXT"]["forward s"] for t in turns)
        for label in chosen
        if "LLaVA-NeXT" in chosen
    }
    spread = f", median of {args.turns} turns" if args.turns > 1 else ""
    print(f"{machine()}; {args.shots} supports + query, all {args.size}², median of {args.repeats}{spread}")
    keys = list(dict.fromkeys(key for row in results.values() for key in row))
    print("| model | " + " | ".join(keys) + " | forward time / LLaVA-NeXT's |")
    print("|---|" + "---|" * (len(keys) + 1))
    for label, row in results.items():
        cells = [f"{row[k]:.2f}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
        ratio = f"{ratios[label]:.2f}" if label in ratios else "n/a"
        print(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
    if args.turns > 1 and ratios:
        for label in chosen:
            each = ", ".join(f"{t[label]['forward s'] / t['LLaVA-NeXT']['forward s']:.2f}" for t in turns)
            print(f"- {label}: forward time / LLaVA-NeXT's in each turn: {each}")


if __name__ == "__main__":
    main()
