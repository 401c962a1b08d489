"""`generate` beyond greedy decoding (greedy, cache equivalence and left padding are in `test_model.py`): beam search,
sampling, several sequences per prompt and assisted decoding, on a batch whose samples hold different numbers of
images and tiles, so that each expanded row must get its own sample's tiles."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import random_image


@pytest.fixture(scope="module")
def batch(tiny):
    model, processor = tiny
    processor.tokenizer.padding_side = "left"
    images = [[random_image(200, 150, 1), random_image(448, 448, 2)], [random_image(500, 240, 3)]]
    inputs = processor(text=["compare <image> with <image>", "is <image> good?"], images=images, padding=True,
                       return_tensors="pt")  # fmt: skip
    processor.tokenizer.padding_side = "right"
    assert inputs["image_grid"][:, 2].tolist() == [7, 5, 3]  # the samples' tiles differ: 12 and 3
    return inputs


def sequence_log_prob(model, inputs, row: int, sequence: torch.Tensor) -> float:
    """Log-probability of the tokens generated after prompt row `row`, from one forward pass over that row alone."""
    grid = inputs["image_grid"]
    images = slice(0, 2) if row == 0 else slice(2, 3)
    tiles = slice(0, int(grid[:2, 2].sum())) if row == 0 else slice(int(grid[:2, 2].sum()), None)
    prompt = inputs["input_ids"].shape[1]
    mask = torch.cat([inputs["attention_mask"][row], torch.ones(len(sequence) - prompt, dtype=torch.long)])
    with torch.no_grad():
        logits = model(input_ids=sequence[None], attention_mask=mask[None], pixel_values=inputs["pixel_values"][tiles],
                       image_grid=grid[images]).logits[0]  # fmt: skip
    return logits[prompt - 1 : -1].log_softmax(-1).gather(-1, sequence[prompt:, None]).sum().item()


def test_beam_search_scores_are_the_sequences_own_probabilities(tiny, batch):
    model, _ = tiny
    out = model.generate(**batch, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False,
                         length_penalty=0.0, output_scores=True, return_dict_in_generate=True)  # fmt: skip
    assert out.sequences.shape[0] == 4  # 2 prompts x 2 sequences, each prompt's rows together
    for index, (sequence, score) in enumerate(zip(out.sequences, out.sequences_scores, strict=True)):
        assert sequence_log_prob(model, batch, index // 2, sequence) == pytest.approx(score.item(), abs=1e-4)


def test_sampling_is_seeded_and_top_1_sampling_is_greedy(tiny, batch):
    model, _ = tiny
    greedy = model.generate(**batch, max_new_tokens=5, do_sample=False)
    top1 = model.generate(**batch, max_new_tokens=5, do_sample=True, top_k=1, num_return_sequences=2)
    assert torch.equal(top1[::2], greedy) and torch.equal(top1[1::2], greedy)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(model.generate(**batch, max_new_tokens=5, do_sample=True, temperature=5.0))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], greedy)  # hot sampling leaves the greedy path


def test_assisted_decoding_gives_the_greedy_answer(tiny, batch):
    model, _ = tiny
    one = {key: value[:1] for key, value in batch.items() if key in ("input_ids", "attention_mask")}
    one.update(pixel_values=batch["pixel_values"][:12], image_grid=batch["image_grid"][:2])
    greedy = model.generate(**one, max_new_tokens=6, do_sample=False)
    assisted = model.generate(**one, max_new_tokens=6, do_sample=False, assistant_model=model)
    assert torch.equal(assisted, greedy)
