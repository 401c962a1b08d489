"""KensaSynth (offline inspection data) and the adapters that turn datasets into training conversations.

What `kensa_vl.eval` may use of the training side is exported here and nowhere else: the inspection episode's
prompt (`episode`), KensaSynth's loader (`load_synth`) and its material names (`MATERIALS`), and for the naming
evaluation the photos per category and defect type (`naming_pools`) and the name pools (`draw_names`).
"""

from .conversations import episode, naming_pools
from .materials import MATERIALS
from .names import draw_names
from .synth import load_synth

__all__ = ["MATERIALS", "draw_names", "episode", "load_synth", "naming_pools"]
