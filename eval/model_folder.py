"""A saved KensaVL folder as the evaluation and the inspector meet it: checked before anything loads it (a corrupt
or foreign folder is refused with what is wrong), loaded through the Auto classes with its own remote code, and its
exact searches shared across the runs of one evaluation (`shared_searches`)."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from kensa_vl.modeling import search_kensa_vl


def check_model_folder(path) -> None:
    """Refuse a local model folder that cannot be a working KensaVL before anything loads it: a missing or unreadable
    `config.json`, another model type, pickle weights only (they can run code when loaded), no weights, or a
    safetensors file that is truncated or corrupt. A Hub id (not a local folder) is left to the Hub."""
    import json
    from pathlib import Path

    folder = Path(path)
    if not folder.is_dir():
        if folder.exists() or str(path).startswith((".", "/")):
            raise ValueError(f"{path}: not a model folder")
        return
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"{folder} has no config.json: not a saved model folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{folder}/config.json is not valid JSON ({err})") from None
    if config.get("model_type") != "kensa_vl":
        raise ValueError(f"{folder} holds a {config.get('model_type')!r} model, not a KensaVL (model_type 'kensa_vl')")
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in folder.glob("*.bin") if p.name != "training_args.bin")
        if pickles:
            raise ValueError(f"{folder} holds pickle weights only ({', '.join(pickles)}), which can run code when "
                             "loaded; save the model with safetensors (save_pretrained does by default)")  # fmt: skip
        raise ValueError(f"{folder} holds no weights (*.safetensors)")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        missing = sorted(set(json.loads(index.read_text())["weight_map"].values()) - {p.name for p in shards})
        if missing:
            raise ValueError(f"{folder}: the weight index names shards that are not there: {missing}")
    for shard in shards:
        _check_safetensors(shard)


def _check_safetensors(path) -> None:
    """A safetensors file's header is JSON that says where each tensor ends: the file must be that long."""
    import json
    import struct

    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        try:
            header = json.loads(handle.read(length)) if length is not None and length <= size - 8 else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
    if header is None:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated header)")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size != 8 + length + end:
        raise ValueError(f"{path} is truncated or corrupt: its header needs {8 + length + end} bytes, it has {size}")


def load_pretrained(path, dtype=None, **config):
    """Model + processor of a KensaVL folder or Hub id, through the Auto classes (remote code); a local folder is
    checked first (`check_model_folder`). `config`: settings that replace the folder's (`reference_coreset=0.25`)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    check_model_folder(path)

    model_type = AutoConfig.from_pretrained(path, trust_remote_code=True).model_type
    if model_type != "kensa_vl":
        raise ValueError(f"{path} holds a {model_type!r} model, not a KensaVL (model_type 'kensa_vl')")
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=dtype or "auto", **config)
    return model, AutoProcessor.from_pretrained(path, trust_remote_code=True)


@contextmanager
def shared_searches(model):
    """One `SearchMemo` for the exact searches of `model`, whose code may be its folder's own copy (remote code), and
    of this package's code (the kNN baseline's) while the block runs: an evaluation that meets the same query and
    support photos again (the baseline after the model, the same examples under other names) searches them once and
    gets the same answers. A model whose code has no memo (saved by an older version) searches as before."""
    package = type(model).__module__.rsplit(".", 1)[0]  # its memo's module: before 2026-12-06 the comparison's
    own = [sys.modules.get(f"{package}.{name}") for name in ("search_kensa_vl", "comparison_kensa_vl")]
    memo = search_kensa_vl.SearchMemo()
    active = [m for m in {search_kensa_vl, *own} if m is not None and hasattr(m, "SearchMemo")]
    previous = [m.SearchMemo.current for m in active]
    for module in active:
        module.SearchMemo.current = memo
    try:
        yield memo
    finally:
        for module, before in zip(active, previous, strict=True):
            module.SearchMemo.current = before
