"""A few ZeRO-3 training steps on CPU in which rank 1 only ever gets text-only batches; run by
tests/test_distributed.py as

    accelerate launch --config_file train/configs/accelerate/zero3.yaml --num_processes 2 --mixed_precision no \
        tests/zero3_job.py TINY_DIR OUT

Test-only shim (hf-contract, section 5): on a CPU-only machine accelerate's `PartialState` reports one process while
DeepSpeed runs two ranks over gloo, and the Trainer's batch-size check fails. `_shim` copies rank and world size from
`torch.distributed` into the shared state. The product never needs it: on GPUs accelerate sees every rank.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from PIL import Image


def _shim() -> None:
    import torch.distributed as dist
    from accelerate.state import PartialState

    state = PartialState()
    if dist.is_initialized() and state.num_processes != dist.get_world_size():
        state.num_processes = dist.get_world_size()
        state.process_index = dist.get_rank()
        state.local_process_index = dist.get_rank()


def _rows(n: int) -> list[dict]:
    """Even rows (rank 0) hold an image, odd rows (rank 1) are text only."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        if i % 2 == 0:
            image = Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8))
            user = [{"type": "image", "text": None}, {"type": "text", "text": "Describe the surface."}]
            rows.append({"messages": _chat(user, "a scratch at the top left"), "images": [image]})
        else:
            user = [{"type": "text", "text": "Is a clean surface good or defective?"}]
            rows.append({"messages": _chat(user, "good"), "images": []})
    return rows


def _chat(user: list, answer: str) -> list:
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def main(tiny: str, out: str) -> None:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl import SFTConfig

    from kensa_vl.train import sft

    training = SFTConfig(
        output_dir=out,
        max_steps=3,
        per_device_train_batch_size=1,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,
        max_length=None,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        seed=0,
    )
    _shim()
    args = sft.KensaArguments(
        model=tiny, stage="multitask", train=["projector", "layer_merges", "language_model", "lm_head"]
    )
    model, processor = sft.load_model(args)
    groups = sft.select_trainable(model, args)
    collator = sft.KensaCollator(processor, assistant_only_loss=True, token_side=model.config.token_side)

    class InOrder(sft.KensaTrainer):  # row i -> rank i % 2, so rank 1 never sees an image
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    trainer = InOrder(
        model=model,
        args=training,
        train_dataset=Dataset.from_list(_rows(2 * training.max_steps)),
        processing_class=processor,
        data_collator=collator,
        param_groups=groups,
    )
    seen = []
    original = collator.torch_call
    collator.torch_call = lambda examples: seen.append(sum(len(e["images"]) for e in examples)) or original(examples)
    trainer.train()
    trainer.save_model(out)
    report = {"rank": trainer.args.process_index, "images_per_batch": seen, "world": trainer.args.world_size}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if trainer.is_world_process_zero():
        processor.save_pretrained(out)
    print("REPORT " + json.dumps({**report, "losses": losses}), flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # a rank exiting with gloo threads alive can abort (SIGABRT)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
