"""Defect and grade names a user might give their examples, for episodes whose answer can only be named by reading
the prompt.

Two disjoint pools: `TRAINING` names the defects of training episodes (`naming_conversations`), `EVALUATION` those
of the naming and label-permutation evaluations (`kensa_vl.eval.naming`). Each holds invented words (seeded
syllables, so no name carries a meaning the model could know), user-style phrases and words in several languages,
Japanese among them. No name of one pool occurs in the other (tested), nor is one a KensaSynth defect type. Grades
have two pools of their own (`GRADES` and `GRADE_WORDS`, `draw_grades`): ordered grade names people use, and
invented words in no order; no evaluation grade name occurs in a training pool.
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


GRADES = {
    "training": (
        ("A", "B", "C", "D"), ("1級", "2級", "3級", "4級"), ("accept", "borderline", "reject"),
        ("I", "II", "III", "IV"), ("上", "中", "下"), ("pass", "marginal", "fail"),
        ("first", "second", "third", "fourth"),
    ),
    "evaluation": (
        ("一等", "二等", "三等", "四等"), ("premium", "standard", "economy"), ("OK", "watch", "NG"),
        ("α", "β", "γ", "δ"), ("Klasse 1", "Klasse 2", "Klasse 3", "Klasse 4"),
    ),
}  # fmt: skip
GRADE_WORDS = {"training": invented_words(120, seed=2), "evaluation": invented_words(60, seed=3)}


def draw_grades(rng: np.random.Generator, count: int, pool: str = "training") -> list[str]:
    """Names for `count` grades, least changed first: half the time a set people use, in its order (when one has
    `count` names), else invented words, which say nothing of the order."""
    ordered = [s for s in GRADES[pool] if len(s) >= count]
    if ordered and rng.random() < 0.5:
        return list(ordered[int(rng.integers(len(ordered)))][:count])
    words = GRADE_WORDS[pool]
    return [words[i] for i in rng.choice(len(words), count, replace=False)]


def check_pools() -> None:
    """Raise when the pools overlap, hold a KensaSynth defect type, or hold a name the answer format cannot carry."""
    shared = set(TRAINING) & set(EVALUATION)
    known = (set(TRAINING) | set(EVALUATION)) & set(DEFECTS)
    unreadable = [n for n in TRAINING + EVALUATION if " at " in f" {n} " or ":" in n or "\n" in n]
    grades = {pool: {n for s in GRADES[pool] for n in s} | set(GRADE_WORDS[pool]) for pool in GRADES}
    shared |= grades["training"] & (grades["evaluation"] | set(EVALUATION)) | grades["evaluation"] & set(TRAINING)
    unreadable += [n for n in grades["training"] | grades["evaluation"] if ":" in n or "," in n or "\n" in n]
    if shared or known or unreadable:
        raise ValueError(f"name pools: shared {sorted(shared)}, defect types {sorted(known)}, unreadable {unreadable}")
