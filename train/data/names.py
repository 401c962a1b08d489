"""Defect names a user might give their examples, for episodes whose answer can only be named by reading the prompt.

Two disjoint pools: `TRAINING` names the defects of training episodes (`naming_conversations`), `EVALUATION` those
of the naming and label-permutation evaluations (`kensa_vl.eval.naming`). Each holds invented words (seeded
syllables, so no name carries a meaning the model could know), user-style phrases and words in several languages,
Japanese among them. No name of one pool occurs in the other (tested), nor is one a KensaSynth defect type.
"""

from __future__ import annotations

import numpy as np

from .defects import DEFECTS

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "ch", "tr", "kl")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "k", "r", "x", "l")

_PHRASES = {
    "training": (
        "hairline", "dull patch", "dark spot", "pit", "smudge", "nick", "scuff", "blotch", "flake", "streak",
        "white mark", "rough edge", "burn mark", "drip", "shadow line",
        "キズ", "打痕", "汚れ", "欠け", "割れ", "シミ", "凹み", "擦れ", "剥がれ", "ムラ", "傷あり", "黒点",
        "Kratzer", "Delle", "mancha", "rayure", "macchia", "划痕", "污渍",
    ),
    "evaluation": (
        "pock mark", "tarnish", "speck", "gouge", "chip", "ridge", "grey haze", "pinprick", "bruise",
        "異物", "変色", "バリ", "ピンホール", "錆", "膨れ", "気泡", "焼け",
        "Fleck", "grieta", "tache", "graffio", "裂纹",
    ),
}  # fmt: skip


def invented_words(count: int, seed: int) -> list[str]:
    """`count` distinct made-up words of two or three syllables, drawn with `seed`."""
    rng, words = np.random.default_rng(seed), []
    while len(words) < count:
        syllables = int(rng.integers(2, 4))
        word = "".join(
            _ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] for _ in range(syllables)
        ) + _CODAS[rng.integers(len(_CODAS))]  # fmt: skip
        if word not in words:
            words.append(word)
    return words


def _pools() -> dict[str, list[str]]:
    training = invented_words(300, seed=0) + list(_PHRASES["training"])
    evaluation = [w for w in invented_words(80, seed=1) if w not in training] + list(_PHRASES["evaluation"])
    return {"training": training, "evaluation": evaluation}


POOLS = _pools()
TRAINING, EVALUATION = POOLS["training"], POOLS["evaluation"]


def draw_names(rng: np.random.Generator, count: int, pool: str = "training") -> list[str]:
    """`count` distinct names from a pool."""
    names = POOLS[pool]
    if count > len(names):
        raise ValueError(f"asked for {count} distinct names; the {pool} pool holds {len(names)}")
    return [names[i] for i in rng.choice(len(names), count, replace=False)]


def check_pools() -> None:
    """Raise when the pools overlap, hold a KensaSynth defect type, or hold a name the answer format cannot carry."""
    shared = set(TRAINING) & set(EVALUATION)
    known = (set(TRAINING) | set(EVALUATION)) & set(DEFECTS)
    unreadable = [n for n in TRAINING + EVALUATION if " at " in f" {n} " or ":" in n or "\n" in n]
    if shared or known or unreadable:
        raise ValueError(f"name pools: shared {sorted(shared)}, defect types {sorted(known)}, unreadable {unreadable}")
