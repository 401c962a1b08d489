"""KensaSynth (offline inspection data) and the adapters that turn datasets into training conversations.

What `kensa_vl.eval` may use of the training side is exported here and nowhere else: the inspection episode's
prompt (`episode`) and the grading prompt (`grading_episode`), KensaSynth's loader (`load_synth`) and its material
names and nouns (`MATERIALS`, `noun`), for the naming evaluation the photos per category and defect type
(`naming_pools`) and the name pools (`draw_names`), and for the grading evaluation the grading tasks' loader, pools,
draws and grades (`load_grading`, `grading_pools`, `draw_grading`, `grade_of`, `is_query`, `draw_grades`,
`ATTRIBUTES`).
"""

from .conversations import episode, grading_episode, naming_pools
from .grading import ATTRIBUTES, draw_grading, grade_of, grading_pools, is_query
from .materials import MATERIALS, noun
from .names import draw_grades, draw_names
from .synth import load_grading, load_synth

__all__ = [
    "ATTRIBUTES",
    "MATERIALS",
    "draw_grades",
    "draw_grading",
    "draw_names",
    "episode",
    "grading_episode",
    "grade_of",
    "grading_pools",
    "is_query",
    "load_grading",
    "load_synth",
    "naming_pools",
    "noun",
]
