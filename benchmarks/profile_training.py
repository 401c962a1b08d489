"""Where a main-job training step goes (issue 25: profile a training step on the machine of the run): the main
recipe's multitask stage, started from a finished align stage, profiled by cProfile over a window of steps.

    python -m benchmarks.profile_training --align outputs/main/align --data outputs/kensa-synth-224 \
        [--steps 60] [--profile-from 40]

The comparison keeps each image pair's nearest-cell similarities (`PairCache`), so early steps search more than
late ones: profile a window after the first steps. Prints seconds per step by part (inside the trainer's
`training_step`: the batches are collated before it), the pair cache's hits and misses, and the machine. The stage's
output goes to a temporary folder.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path
from unittest import mock

from kensa_vl.eval.measure import machine

# part -> (file name ending, function name) whose cumulative time it is; parts may nest (the searches are part of
# the comparison, TRL's log-probabilities' backward part of the backward pass)
PARTS = {
    "the comparison (`compare_prompt`)": ("comparison_kensa_vl.py", "compare_prompt"),
    "exact nearest-cell searches": ("search_kensa_vl.py", "exact_similarity"),
    "the photo's own cells (`own_nearest`)": ("comparison_kensa_vl.py", "own_nearest"),
    "towers (`encode_tiles`)": ("vision_kensa_vl.py", "encode_tiles"),
    "backward pass": ("torch/autograd/graph.py", "_engine_run_backward"),
    "TRL's chunked log-probabilities, backward": ("chunked_logprob.py", "backward"),
}


def part_seconds(stats: pstats.Stats) -> dict[str, float]:
    """Each of PARTS: the cumulative seconds of the functions it names (summed where several match)."""
    out = dict.fromkeys(PARTS, 0.0)
    for (path, _, function), (_, _, _, cumulative, _) in stats.stats.items():
        for part, (ending, name) in PARTS.items():
            if function == name and path.endswith(ending):
                out[part] += cumulative
    return out


def profile(align: Path, data: Path, steps: int, start: int) -> tuple[dict[str, float], float, tuple[int, int]]:
    """Run `steps` multitask steps from `align`, profiling steps `start`..`steps`: (seconds per part, the profiled
    steps' wall seconds, the pair cache's (hits, misses) at the end)."""
    from kensa_vl.train.pipeline import RECIPES, train_stage
    from kensa_vl.train.sft import KensaTrainer

    profiler, seen, wall, original = cProfile.Profile(), [0], [0.0], KensaTrainer.training_step

    def step(self, *args, **kwargs):
        profiling, began = seen[0] >= start, time.perf_counter()
        if profiling:
            profiler.enable()
        try:
            return original(self, *args, **kwargs)
        finally:
            if profiling:
                profiler.disable()
                wall[0] += time.perf_counter() - began
            seen[0] += 1

    with tempfile.TemporaryDirectory() as out, mock.patch.object(KensaTrainer, "training_step", step):
        overrides = ["--model", str(align), "--data", str(data), "--output_dir", out, "--max_steps", str(steps),
                     "--report_to", "none", "--save_strategy", "no"]  # fmt: skip
        trainer = train_stage(RECIPES / "multitask.yaml", overrides)
    cache = trainer.accelerator.unwrap_model(trainer.model).model.reference_comparison.pair_cache
    counts = (cache.hits, cache.misses) if cache is not None else (0, 0)
    return part_seconds(pstats.Stats(profiler)), wall[0], counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--align", required=True, help="a finished align stage (the main job's outputs/main/align)")
    parser.add_argument("--data", required=True, help="the main job's KensaSynth folder")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--profile-from", type=int, default=40, help="the first profiled step (0-based)")
    args = parser.parse_args(argv)
    if not 0 <= args.profile_from < args.steps:
        raise SystemExit(f"--profile-from must lie in [0, --steps = {args.steps}), got {args.profile_from}")
    began = time.perf_counter()
    seconds, wall, (hits, misses) = profile(Path(args.align), Path(args.data), args.steps, args.profile_from)
    profiled = args.steps - args.profile_from
    print(f"{machine()}; multitask steps {args.profile_from}-{args.steps - 1} of a {args.steps}-step run "
          f"({time.perf_counter() - began:.0f} s in all); pair cache {hits} hits, {misses} misses")  # fmt: skip
    print("| part | s per step | share of the step |\n|---|---|---|")
    print(f"| training step (wall, profiled) | {wall / profiled:.2f} | 100% |")
    for part, value in seconds.items():
        print(f"| {part} | {value / profiled:.2f} | {value / wall:.0%} |")


if __name__ == "__main__":
    main()
