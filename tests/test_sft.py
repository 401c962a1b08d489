"""train/sft.py in one process: labels of a real batch, per-stage freezing, LoRA scoping, recipe errors."""

from __future__ import annotations

import copy

import pytest
import torch

from kensa_vl.train import sft  # the module `accelerate launch train/sft.py` runs


def _args(synth_dir, tmp_path, **kwargs):
    from trl import SFTConfig

    recipe = {"data": str(synth_dir), "num_rows": 8, "mixture": ["episodes=1", "captions=1", "detection=1"], **kwargs}
    training = SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        max_length=None,
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        logging_steps=1,
        seed=0,
    )
    return sft.KensaArguments(**recipe), training


def test_only_assistant_answers_count_in_the_loss(synth_dir, tmp_path, tiny):
    args, training = _args(synth_dir, tmp_path)
    model, processor = tiny
    train, _ = sft.load_data(args, seed=0)
    rows = [train[i] for i in range(len(train))]
    batch = sft.KensaCollator(processor, assistant_only_loss=True, token_side=model.config.token_side)(rows)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_id).any() and not (batch["labels"] == image_id).any()
    for row, ids, labels in zip(rows, batch["input_ids"], batch["labels"], strict=True):
        answer = row["messages"][-1]["content"][0]["text"]
        learnt = processor.tokenizer.decode(ids[labels != -100], skip_special_tokens=False)
        assert learnt == answer + "<|im_end|>"


def test_the_surfaces_source_draws_real_surface_episodes(synth_dir, surfaces_dir, tmp_path):
    from kensa_vl.train.data.materials import MATERIALS, REAL_MATERIALS

    args, _ = _args(synth_dir, tmp_path, mixture=["episodes=1", "surfaces=1"], num_rows=40, surfaces=str(surfaces_dir))
    train, _ = sft.load_data(args, seed=0)
    nouns = {m.noun for m in REAL_MATERIALS.values()} - {m.noun for m in MATERIALS.values()}
    rows = [train[i] for i in range(len(train))]
    real = [any(noun in str(row["messages"]) for noun in nouns) for row in rows]  # the prompt names the product
    assert real == [row["source"] == "surfaces" for row in rows] and 0 < sum(real) < len(rows)


def test_align_trains_only_projector_and_merges_and_saves_a_loadable_model(synth_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    args, training = _args(synth_dir, tmp_path)
    from kensa_vl.train.build import build_tiny

    before = {k: v.clone() for k, v in build_tiny()[0].state_dict().items()}
    trainer = sft.main(args, training)
    after = trainer.model.state_dict()
    changed = {k.split(".")[1] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"multi_modal_projector", "layer_merges"}
    model, info = AutoModelForImageTextToText.from_pretrained(
        training.output_dir, trust_remote_code=True, output_loading_info=True
    )
    assert not any(info.values())
    assert torch.equal(
        model.state_dict()["model.multi_modal_projector.mlps.fused.0.weight"],
        after["model.multi_modal_projector.mlps.fused.0.weight"],
    )


def test_multitask_unfreezes_the_last_tower_layer_at_a_lower_rate(synth_dir, tmp_path):
    args, training = _args(
        synth_dir, tmp_path, train=["projector", "language_model"], vision_unfreeze_layers=1, vision_lr=1e-4
    )
    model, _ = sft.load_model(args)
    groups = sft.select_trainable(model, args)
    names = {id(p): n for n, p in model.named_parameters()}
    vision = [names[id(p)] for p in groups["vision"]]
    assert vision and all(".vision_towers." in n and (".layers.1." in n or ".layer.1." in n) for n in vision)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".layers.0." in n and "vision" in n)
    trainer = sft.KensaTrainer(
        model=model,
        args=training,
        train_dataset=sft.load_data(args, 0)[0],
        processing_class=_,
        data_collator=sft.KensaCollator(_, assistant_only_loss=True, token_side=model.config.token_side),
        param_groups=groups,
        vision_lr=1e-4,
    )
    optimizer = trainer.create_optimizer()
    assert [g["lr"] for g in optimizer.param_groups] == [training.learning_rate, 1e-4]


def test_lora_is_scoped_to_the_language_model(synth_dir, tmp_path):
    regex = r".*language_model.*\.(q_proj|v_proj)"
    args, _ = _args(synth_dir, tmp_path, lora_target=regex)
    model, _ = sft.load_model(args)
    config = sft.lora_config(model, args)
    assert config.target_modules == regex and config.modules_to_save == ["multi_modal_projector"]
    bad = sft.KensaArguments(lora_target=r".*\.(q_proj|v_proj)")  # SigLIP's attention has q_proj/v_proj too
    with pytest.raises(ValueError, match="must hit the language model only"):
        sft.lora_config(model, bad)


def test_max_length_inside_an_image_fails_before_training(synth_dir, tmp_path):
    args, training = _args(synth_dir, tmp_path)
    training.max_length = 40
    with pytest.raises(ValueError, match="truncating to max_length=40 would cut"):
        sft.main(args, training)
    assert not (tmp_path / "run").exists()  # nothing trained or written


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stage": "pretrain"}, "stage must be one of"),
        ({"train": ["projector", "adapter"]}, r"unknown components \['adapter'\]"),
        ({"mixture": ["webdocs=1"]}, "mixture entries are `source=weight`"),
    ],
)
def test_bad_recipes_fail_before_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sft.KensaArguments(**kwargs)


def _losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_resuming_mid_run_repeats_the_uninterrupted_loss_sequence(synth_dir, tmp_path):
    parts = ["projector", "language_model", "lm_head"]
    args, training = _args(synth_dir, tmp_path, stage="multitask", train=parts)
    args.num_rows = 12
    training.max_steps, training.save_strategy, training.save_steps = 6, "steps", 3
    whole = _losses(sft.main(args, training))
    assert sorted(whole) == [1, 2, 3, 4, 5, 6]

    args, resumed = _args(
        synth_dir, tmp_path / "again", stage="multitask", train=["projector", "language_model", "lm_head"]
    )
    args.num_rows = 12
    resumed.max_steps, resumed.save_strategy, resumed.save_steps = 6, "steps", 3
    resumed.resume_from_checkpoint = str(tmp_path / "run" / "checkpoint-3")
    trainer = sft.main(args, resumed)
    saved = sorted(p.name for p in (tmp_path / "again" / "run").glob("checkpoint-*"))
    assert saved == ["checkpoint-6"]  # it trained steps 4-6 only
    rest = _losses(trainer)  # steps 1-3 come back from the checkpoint's state, 4-6 are trained again
    assert [rest[s] for s in (4, 5, 6)] == pytest.approx([whole[s] for s in (4, 5, 6)], rel=1e-5)


def test_the_fused_lm_head_scores_the_labelled_positions_alone(synth_dir, tmp_path, tiny, monkeypatch):
    """TRL's fused LM head over a real batch (what `compute_loss` runs): under `labelled_positions_only` it scores
    only the positions that carry a label, and every per-token output equals scoring all of them."""
    from trl.kernels import chunked_logprob
    from trl.trainer.utils import add_fused_lm_head

    args, _ = _args(synth_dir, tmp_path)
    model, processor = copy.deepcopy(tiny[0]), tiny[1]  # the patched forward stays on this copy
    train, _ = sft.load_data(args, seed=0)
    batch = sft.KensaCollator(processor, assistant_only_loss=True, token_side=model.config.token_side)(
        [train[i] for i in range(4)]
    )
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    rows, apply = [], chunked_logprob.ChunkedLogProbFunction.apply
    monkeypatch.setattr(
        chunked_logprob.ChunkedLogProbFunction, "apply", lambda h, *a: rows.append(len(h)) or apply(h, *a)
    )
    with torch.no_grad():
        every = model(**batch, fused_lm_head=True)
        with sft.labelled_positions_only():
            labelled = model(**batch, fused_lm_head=True)
    shifted = batch["labels"][:, 1:]
    assert rows == [shifted.numel(), int((shifted != -100).sum())] and rows[1] < rows[0] / 3
    for name in ("log_probs", "entropy", "is_top1"):
        torch.testing.assert_close(getattr(labelled, name), getattr(every, name), rtol=1e-5, atol=1e-5)


def test_a_right_padded_batch_runs_causal_with_the_same_loss_and_gradients(synth_dir, tmp_path, tiny):
    """`right_padding_as_causal`: the language model's layers get no mask for a right-padded batch (SDPA's causal
    kernel), and the loss and every gradient equal those of the masked run; a left-padded mask is passed on."""
    args, _ = _args(synth_dir, tmp_path)
    model, processor = copy.deepcopy(tiny[0]), tiny[1]
    train, _ = sft.load_data(args, seed=0)
    batch = sft.KensaCollator(processor, assistant_only_loss=True, token_side=model.config.token_side)(
        [train[i] for i in range(4)]
    )
    assert not batch["attention_mask"].all()  # rows of different lengths: padded on the right
    seen = []
    model.model.language_model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True
    )

    def loss_and_grads(**inputs):
        model.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    masked = loss_and_grads(**batch)
    with sft.right_padding_as_causal(model.model.language_model):
        causal = loss_and_grads(**batch)
        left = torch.ones(4, 8, dtype=torch.long)
        left[0, :3] = 0  # padded on the left
        model.model.language_model(input_ids=batch["input_ids"][:, :8], attention_mask=left)
    assert seen[0] is not None and seen[1] is None and seen[2] is not None
    torch.testing.assert_close(causal[0], masked[0], rtol=1e-5, atol=1e-6)
    assert causal[1].keys() == masked[1].keys() and len(masked[1]) > 10
    for name, grad in masked[1].items():
        torch.testing.assert_close(causal[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_pair_searches_are_kept_only_while_the_compared_encoders_cannot_change():
    from kensa_vl.train.build import build_tiny

    model, _ = build_tiny(tile_size=112, max_tiles=4, reference_comparison=True, dct=True, reference_encoders=["dct"])
    assert sft.keep_pair_searches(model) and model.model.reference_comparison.pair_cache is not None
    model, _ = build_tiny(tile_size=112, max_tiles=4, reference_comparison=True, reference_encoders=["dinov2"])
    assert not sft.keep_pair_searches(model)  # its tower trains: a kept search would go stale
    assert model.model.reference_comparison.pair_cache is None
    model.model.vision_towers["dinov2"].requires_grad_(False)
    assert sft.keep_pair_searches(model) is False  # its layer merge still trains
    model.model.layer_merges["dinov2"].requires_grad_(False)
    assert sft.keep_pair_searches(model)
    assert not sft.keep_pair_searches(build_tiny()[0])  # no comparison


def test_the_bank_takes_the_training_views_and_the_saved_model_keeps_its_own(synth_dir, tmp_path, monkeypatch):
    from transformers import AutoConfig

    from kensa_vl.modeling.modeling_kensa_vl import KensaVLModel
    from kensa_vl.train.build import build_tiny, save_kensa

    views = ["hflip", "rot90"]
    settings = {"tile_size": 112, "max_tiles": 4, "reference_comparison": True, "dct": True}
    model, processor = build_tiny(**settings, reference_views=views)
    start = save_kensa(model, processor, tmp_path / "start")
    seen, cells = [], KensaVLModel.reference_cells

    def spy(self, *args, **kwargs):
        seen.append(list(self.config.reference_views))
        return cells(self, *args, **kwargs)

    monkeypatch.setattr(KensaVLModel, "reference_cells", spy)
    args, training = _args(synth_dir, tmp_path, model=str(start), mixture=["episodes=1"],
                           train_reference_views=[])  # fmt: skip
    training.save_strategy, training.save_steps = "steps", 1
    sft.main(args, training)
    assert seen and all(v == [] for v in seen)  # every bank of the training episodes without views
    for folder in (training.output_dir, f"{training.output_dir}/checkpoint-1"):
        assert AutoConfig.from_pretrained(folder, trust_remote_code=True).reference_views == views
    with pytest.raises(ValueError, match=r"train_reference_views must be distinct views of .*got \['spin'\]"):
        sft.KensaArguments(data=str(synth_dir), train_reference_views=["spin"])
