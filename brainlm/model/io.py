"""Model folders: ``model.safetensors`` + ``config.json`` (+ ``scaling.json``, ``extra.json``), and the head files of
a fine-tuned model. Written atomically (``brainlm.atomic``), config.json last; read onto the meta device, tensors
assigned rather than copied.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from brainlm import atomic
from brainlm.exceptions import CheckpointError

WEIGHTS_FILE, CONFIG_FILE, SCALING_FILE, EXTRA_FILE = "model.safetensors", "config.json", "scaling.json", "extra.json"


# URI prefix -> a function that returns a local model folder for it. The tracking layer registers ``models:/`` and
# ``runs:/`` (brainlm.api does, on import); the model package itself knows only folders.
RESOLVERS: dict[str, Callable[[str], Path]] = {}


def register_resolver(prefix: str, resolve: Callable[[str], Path]) -> None:
    RESOLVERS[prefix] = resolve


def local_folder(source: str | Path) -> Path:
    """The model folder behind ``source``: a folder, or a URI a registered resolver knows (``models:/NAME@ALIAS``)."""
    text = str(source)
    for prefix, resolve in RESOLVERS.items():
        if text.startswith(prefix):
            return Path(resolve(text))
    if text.startswith(REGISTRY_SCHEMES):
        raise FileNotFoundError(
            f"{text}: a registry URI needs the tracking layer; load it with brainlm.load({text!r}) (or import "
            "brainlm.api first), which needs the [train] or [tune] extra for MLflow"
        )
    return Path(text)


REGISTRY_SCHEMES = ("models:/", "runs:/")


def model_folder(source: str | Path) -> Path:
    """An exported model folder given as a path (no registry involved): it must hold config.json."""
    path = Path(source)
    if not (path / CONFIG_FILE).exists():
        raise CheckpointError(
            f"--model {source}: expected an exported model folder (model.safetensors + config.json) or a "
            "registry URI like models:/brainlm-debug@current"
        )
    return path


def json_writer(content: dict[str, Any]) -> atomic.Writer:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(content, f, indent=2, allow_nan=False)
            f.write("\n")

    return write


def tensors_writer(module: nn.Module) -> atomic.Writer:
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    return lambda tmp: save_file(state, tmp, metadata={"format": "pt"})


def write_folder(folder: str | Path, files: dict[str, atomic.Writer | None]) -> None:
    """Write ``files`` (name -> writer) into ``folder`` atomically, in order; a name mapped to None is removed (a
    stale file from an earlier save)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:  # what a killed earlier save of these files left (atomic's temporaries): one writer per folder
        for stale in folder.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    atomic.write_all([(folder / name, write) for name, write in files.items() if write is not None])
    for name, write in files.items():
        if write is None:
            (folder / name).unlink(missing_ok=True)


def save_model(
    path: str | Path, module: nn.Module, config: dict[str, Any], scaling: dict | None, extra: dict | None
) -> None:
    """A model folder: model.safetensors, scaling.json and extra.json when given (a stale one removed), config.json
    last, each written to a temporary name and renamed: a reader never sees a half-written file."""
    write_folder(
        path,
        {
            WEIGHTS_FILE: tensors_writer(module),
            SCALING_FILE: json_writer(scaling) if scaling is not None else None,
            EXTRA_FILE: json_writer(extra) if extra is not None else None,
            CONFIG_FILE: json_writer(config),
        },
    )


def load_model(cls: type, config_cls: type, path: str | Path, map_location: str | torch.device) -> Any:
    """A model folder read into ``cls(config_cls.from_dict(config.json))``, built on the meta device (every tensor
    comes from the file), with ``.scaling`` and ``.extra`` (or None). The config is checked against the weights'
    shapes before anything is built."""
    folder = local_folder(path)
    require_files(folder, (CONFIG_FILE, WEIGHTS_FILE), f"{cls.__name__}.save_pretrained")
    try:
        config = config_cls.from_dict(read_json(folder / CONFIG_FILE))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / CONFIG_FILE} is not a {cls.__name__} config: {err}") from None
    check_sizes(config, weight_shapes(folder / WEIGHTS_FILE), folder / WEIGHTS_FILE)
    with torch.device("meta"):
        model = cls(config)
    load_weights(model, folder / WEIGHTS_FILE, map_location)
    model.scaling = load_scaling(folder)
    model.extra = read_json(folder / EXTRA_FILE)
    return model


def read_json(file: str | Path) -> dict[str, Any] | None:
    """A JSON file's object, or None when the file does not exist. Anything but a JSON object is refused: a model
    folder is untrusted input."""
    file = Path(file)
    if not file.is_file():
        return None
    try:
        content = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{file} is not valid JSON ({err}); the folder was damaged or written by something else: export or "
            "download the model again"
        ) from None
    if not isinstance(content, dict):
        raise CheckpointError(
            f"{file} holds a JSON {type(content).__name__}, not an object; the folder was damaged or written by "
            "something else: export or download the model again"
        )
    return content


def weight_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a safetensors file, from its header alone (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except Exception as err:  # safetensors raises its own error for a truncated or foreign file
        raise CheckpointError(
            f"{file} cannot be read as safetensors ({type(err).__name__}: {err}); the file is truncated or damaged: "
            "export or download the model again"
        ) from None


def check_sizes(config: Any, shapes: dict[str, tuple[int, ...]], file: Path) -> None:
    """The config's depth and widths against the weights' own shapes, before a module is built: a crafted config
    (a million layers, a huge width) is refused instead of building it."""
    layers = {int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")}
    decoder_layers = {int(k.split(".")[1]) for k in shapes if k.startswith("decoder_blocks.")}
    expected = {
        "num_layers": (config.num_layers, len(layers)),
        "decoder_num_layers": (config.decoder_num_layers, len(decoder_layers)),
        "hidden_size": (config.hidden_size, shapes.get("patch_embed.weight", (None,))[0]),
        "decoder_hidden_size": (config.decoder_hidden_size, shapes.get("decoder_embed.weight", (None,))[0]),
    }
    wrong = {k: v for k, v in expected.items() if v[0] != v[1]}
    if wrong:
        said = ", ".join(f"{k} {a} in config.json but {b} in the weights" for k, (a, b) in wrong.items())
        raise CheckpointError(
            f"{file} does not match the model its config describes ({said}); the folder was damaged or assembled "
            "from two models: export or download it again"
        )


def require_files(folder: Path, names: tuple[str, ...], writer: str) -> None:
    for name in names:
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name} not found: a model folder holds {', '.join(names)}, as written by {writer}"
            )


def load_weights(module: nn.Module, file: Path, device: str | torch.device = "cpu") -> None:
    """Load a safetensors file into a (meta-device) module, strictly."""
    try:
        state = load_file(file, device=str(torch.device(device)))
    except Exception as err:  # safetensors raises its own error for a truncated or foreign file
        raise CheckpointError(
            f"{file} cannot be read as safetensors ({type(err).__name__}: {err}); the file is truncated or damaged: "
            "export or download the model again"
        ) from None
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{file} does not match the model its config describes: {e}") from e


def load_scaling(path: str | Path) -> dict[str, Any] | None:
    """The robust-scaling statistics saved with a model folder (scaling.json), or None."""
    return read_json(Path(path) / SCALING_FILE)


def trained_on(extra: dict | None) -> list[dict]:
    """The shard sets a model was pretrained on, oldest first (what extra.json records; older exports: one)."""
    extra = extra or {}
    if extra.get("trained_on"):
        return list(extra["trained_on"])
    if extra.get("shards"):
        keys = ("shards", "manifest_sha256", "tr", "steps")
        return [{k: extra.get(k) for k in keys} | {"atlas": (extra.get("atlas") or {}).get("name")}]
    return []
