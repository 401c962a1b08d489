"""Real sizes on a GPU (bf16, SDPA, random weights): SigLIP-so400m/14 + DINOv2-L/14 + a Qwen2.5 LM, one 4-shot
episode of 1344² photos. Training: tokens/s, model FLOPs utilisation (FLOPs counted by torch's FlopCounterMode on
one step, recomputation not counted), peak memory; inference: per-query latency and queries/s with the cached
support set.

    python -m benchmarks.gpu [--lm 1.5b] [--steps 5] [--checkpointing] [--peak-tflops 989] [--compare dct bandpass]
    python -m benchmarks.gpu --tiny --size 448 --steps 1    # the code path on a CPU, small model
    python -m benchmarks.gpu --no-train --peer              # beside LLaVA-NeXT's forward over the same episode
    python -m benchmarks.gpu --no-train --fine-tiles 16     # a query judged at a second tile budget too
    python -m benchmarks.gpu --no-train --phases            # a query judged moved half a cell too (`phases=2`)
    python -m benchmarks.gpu --no-train --compare dinov2 --mask-background dinov2   # the background masked

`--peak-tflops`: the accelerator's dense bf16 peak (H100 / H200 SXM: 989). `--compare`: the reference comparison on
these encoders with every reference view, as `kensa-vl assemble --compare` builds it (a tower's name, "dct",
"bandpass", "contrast"); the comparison's FLOPs count towards the utilisation like any other. `--peer`: LLaVA-NeXT
(CLIP ViT-L/14 at 336 px, anyres ≤ 672², the same language model, random weights) runs the same episode's forward
through its own processor, and the ratio of the two forwards is printed.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.episode import inspector_episode, photos
from benchmarks.memory_estimate import comparison_settings, language_model, real_config
from benchmarks.peers import build, tokenizer_with_peer_tokens
from kensa_vl.eval.inspector import Inspector, support_item
from kensa_vl.eval.measure import PeakMemory, machine, timed
from kensa_vl.modeling.modeling_kensa_vl import KensaVLForConditionalGeneration
from kensa_vl.train.build import make_processor, set_token_ids, tiny_config, train_tokenizer


def _matched_heads(formula, query: int):
    """`formula` (torch's SDPA FLOP count over shapes: the query's and those before it, key, value) with the key and
    value given as many heads as the query: torch before 2.13 rejects grouped-query attention (Qwen2's), whose
    kernels broadcast the key/value heads."""

    def count(*shapes, out_shape=None, **kwargs):
        heads, shapes = shapes[query][1], list(shapes[: query + 3])
        for i in (query + 1, query + 2):
            shapes[i] = (shapes[i][0], heads, *shapes[i][2:])
        return formula(*shapes)

    return count


def gqa_flop_formulas() -> dict:
    """FlopCounterMode's `custom_mapping` for the SDPA kernels of every torch version this project supports."""
    aten, kinds = torch.ops.aten, ("efficient", "flash", "cudnn")
    forward = {getattr(aten, f"_scaled_dot_product_{k}_attention", None) for k in kinds} - {None}
    backward = {getattr(aten, f"_scaled_dot_product_{k}_attention_backward", None) for k in kinds} - {None}
    mapping = {op: _matched_heads(flop_counter.sdpa_flop_count, 0) for op in forward}
    return mapping | {op: _matched_heads(flop_counter.sdpa_backward_flop_count, 1) for op in backward}


def training(model, inputs: dict, labels: torch.Tensor, args) -> None:
    """A training step's time, tokens/s, FLOPs utilisation and peak memory (every parameter trained, AdamW)."""
    if args.checkpointing:  # recent transformers call it activation checkpointing; v6 drops the old name
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=labels.is_cuda)

    def step():
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False, custom_mapping=gqa_flop_formulas()) as counter:
        model(**inputs, labels=labels).loss.backward()
    flops = counter.get_total_flops()
    optimizer.zero_grad(set_to_none=True)
    seconds = timed(step, args.steps)
    with PeakMemory() as memory:
        step()
    print(f"| training: step s (median of {args.steps}) | {seconds:.3f} |")
    print(f"| training: TFLOP per step | {flops / 1e12:.1f} |")
    print(f"| training: tokens/s | {labels.shape[1] / seconds:,.0f} |")
    mfu = flops / seconds / (args.peak_tflops * 1e12)
    print(f"| training: model FLOPs utilisation | {mfu:.1%} of {args.peak_tflops:g} TFLOPS |")
    print(f"| training: peak memory above weights (GiB) | {memory.peak / 2**30:.1f} |")


def looks_latency(model, processor, images: list, query, steps: int, **looks) -> float:
    """A cached query's seconds when it is judged in a second look too, as `kensa-vl inspect` does (`looks`:
    `fine_tiles=N`, a second tile budget, or `phases=2`, moved half a cell): both looks' support sets cached,
    scores only."""
    inspector = Inspector(model, processor, max_new_tokens=0, **looks)
    inspector.set_support([support_item(image) for image in images[:-1]])
    inspector.judge(query)  # warm-up
    return timed(lambda: inspector.judge(query), steps)


# LLaVA-NeXT's tower, CLIP ViT-L/14 at 336 px (0.3 B)
CLIP_L = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}


def peer_forward(args, device: str, dtype, images: list) -> float:
    """LLaVA-NeXT's forward over the same episode, its own processor, the same language model (tiny: the small
    peers of `benchmarks.peers`)."""
    if args.tiny:
        built = build("LLaVA-NeXT")
    else:
        tokenizer = tokenizer_with_peer_tokens()
        with torch.device(device):
            built = build("LLaVA-NeXT", tokenizer, vision=CLIP_L, text=language_model(args.lm))
    model = built.model.to(device, dtype).eval()
    inputs = {k: v.to(device) for k, v in built.inputs(images).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    tokens = inputs["input_ids"].shape[1]
    with torch.no_grad():
        seconds = timed(lambda: model(**inputs), args.steps)
    print(f"| LLaVA-NeXT, whole episode ({tokens} tokens, {model.num_parameters() / 1e9:.2f} B): forward s | "
          f"{seconds:.3f} |")  # fmt: skip
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", default="1.5b", choices=["1.5b", "7b"])
    parser.add_argument("--tiny", action="store_true", help="the tiny model (checks the code path on a CPU)")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--size", type=int, default=1344)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--compare", nargs="*", default=[], help="encoders the reference comparison runs on")
    parser.add_argument("--no-train", action="store_true", help="inference only")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on a GPU, else float32")
    parser.add_argument("--peer", action="store_true", help="LLaVA-NeXT's forward over the same episode beside")
    parser.add_argument(
        "--support-tiles", type=int, help="also the episode as `kensa-vl inspect` runs it, supports read at N tiles"
    )
    parser.add_argument("--fine-tiles", type=int, help="also a cached query judged at a second budget of N tiles")
    parser.add_argument("--phases", action="store_true", help="also a cached query judged moved half a cell too")
    parser.add_argument("--mask-background", help="the compared encoder that masks the background (real size only)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    torch.manual_seed(0)
    tokenizer = train_tokenizer()
    if args.tiny:
        own = {name: name in args.compare for name in ("dct", "bandpass", "contrast")}
        config = tiny_config(tokenizer, **own, **comparison_settings(args.compare))
    else:
        config = real_config(args.lm, args.compare, args.mask_background)
    set_token_ids(config, tokenizer)
    with torch.device(device):
        model = KensaVLForConditionalGeneration(config).to(dtype)
    processor = make_processor(tokenizer, config)
    images = photos(args.shots + 1, args.size)
    prompt = "".join("Example: <image>\n" for _ in range(args.shots)) + "Query: <image> Is it defective? good"
    inputs = {k: v.to(device) for k, v in processor(text=prompt, images=images, return_tensors="pt").items()}
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == config.image_token_id, -100)
    tokens = inputs["input_ids"].shape[1]
    print(f"{machine()}; {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, {dtype}")
    compared = f"comparison on {', '.join(args.compare)} with every view" if args.compare else "no comparison"
    print(f"episode: {args.shots} supports + query, {args.size}², {tokens} tokens, {compared}")
    print("| measure | value |\n|---|---|")
    if not args.no_train:
        training(model, inputs, labels, args)
    model.eval()
    with torch.no_grad():
        forward = timed(lambda: model(**inputs), args.steps)
    with torch.no_grad(), PeakMemory() as memory:
        model(**inputs)
    print(f"| inference, whole episode: forward s | {forward:.3f} |")
    print(f"| inference, whole episode: peak memory above weights (GiB) | {memory.peak / 2**30:.1f} |")
    inspector = Inspector(model, processor, max_new_tokens=0)
    inspector.set_support([support_item(image) for image in images[:-1]])
    queries = photos(args.queries, args.size, seed=1)
    inspector.judge(queries[:1])  # warm-up
    latency = timed(lambda: inspector.judge(queries[0]), args.steps)
    start = time.perf_counter()
    inspector.judge(queries, batch_size=len(queries))
    if device == "cuda":
        torch.cuda.synchronize()
    qps = len(queries) / (time.perf_counter() - start)
    print(f"| inference, cached support: ms per query | {latency * 1e3:.0f} |")
    print(f"| inference, cached support: queries/s at batch {len(queries)} | {qps:.1f} |")
    looks = {f"at {args.fine_tiles} tiles": {"fine_tiles": args.fine_tiles}} if args.fine_tiles else {}
    if args.phases:
        looks["moved half a cell"] = {"phases": 2}
    for name, setting in looks.items():
        both = looks_latency(model, processor, images, queries[0], args.steps, **setting)
        print(f"| inference, cached support, also judged {name}: ms per query | {both * 1e3:.0f} "
              f"({both / latency:.2f}x) |")  # fmt: skip
    if args.support_tiles:
        forward = timed(inspector_episode(model, processor, images, args.support_tiles)[1], args.steps)
        read = f"supports read at {args.support_tiles} tile(s), bank in full"
        print(f"| Inspector's episode, {read}: s | {forward:.3f} |")
    if args.peer:
        del inspector, model
        if device == "cuda":
            torch.cuda.empty_cache()
        ratio = forward / peer_forward(args, device, dtype, images)
        which = "the Inspector's episode" if args.support_tiles else "whole episode's forward"
        print(f"| {which} / LLaVA-NeXT's | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
