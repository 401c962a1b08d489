"""Real sizes on a GPU (bf16, SDPA, random weights): SigLIP-so400m/14 + DINOv2-L/14 + a Qwen2.5 LM, one 4-shot
episode of 1344² photos. Training: tokens/s, model FLOPs utilisation (FLOPs counted by torch's FlopCounterMode on
one step, recomputation not counted), peak memory; inference: per-query latency and queries/s with the cached
support set.

    python -m benchmarks.gpu [--lm 1.5b] [--steps 5] [--checkpointing] [--peak-tflops 989]
    python -m benchmarks.gpu --tiny --size 448 --steps 1    # the code path on a CPU, small model

`--peak-tflops`: the accelerator's dense bf16 peak (H100 / H200 SXM: 989).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.episode import photos
from benchmarks.memory_estimate import real_config
from kensa_vl.eval.inspector import Inspector, support_item
from kensa_vl.eval.measure import PeakMemory, machine, timed
from kensa_vl.modeling.modeling_kensa_vl import KensaVLForConditionalGeneration
from kensa_vl.train.build import make_processor, set_token_ids, tiny_config, train_tokenizer


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
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    tokenizer = train_tokenizer()
    config = tiny_config(tokenizer) if args.tiny else real_config(args.lm)
    set_token_ids(config, tokenizer)
    with torch.device(device):
        model = KensaVLForConditionalGeneration(config).to(dtype)
    processor = make_processor(tokenizer, config)
    images = photos(args.shots + 1, args.size)
    prompt = "".join("Example: <image>\n" for _ in range(args.shots)) + "Query: <image> Is it defective? good"
    inputs = {k: v.to(device) for k, v in processor(text=prompt, images=images, return_tensors="pt").items()}
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == config.image_token_id, -100)
    tokens = inputs["input_ids"].shape[1]
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")

    def step():
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        model(**inputs, labels=labels).loss.backward()
    flops = counter.get_total_flops()
    optimizer.zero_grad(set_to_none=True)
    seconds = timed(step, args.steps)
    with PeakMemory() as memory:
        step()
    print(f"{machine()}; {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, {dtype}")
    print(f"episode: {args.shots} supports + query, {args.size}², {tokens} tokens, {flops / 1e12:.1f} TFLOP per step")
    print("| training | value |\n|---|---|")
    print(f"| step (s, median of {args.steps}) | {seconds:.3f} |")
    print(f"| tokens/s | {tokens / seconds:,.0f} |")
    mfu = flops / seconds / (args.peak_tflops * 1e12)
    print(f"| model FLOPs utilisation | {mfu:.1%} of {args.peak_tflops:g} TFLOPS |")
    print(f"| peak memory above weights (GiB) | {memory.peak / 2**30:.1f} |")
    model.eval()
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


if __name__ == "__main__":
    main()
