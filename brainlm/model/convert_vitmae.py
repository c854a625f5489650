"""Read the ViT-MAE BrainLM releases (``vitmae_111M``, ``vitmae_650M``: transformers' ``ViTMAEForPreTraining``) into
our ``ImageMAE`` (brainlm/model/vitmae.py), exactly.

The release is a Hugging Face folder (config.json + weights) of the image MAE. What it does not hold, and where it
comes from here: the parcels' row order (their Y coordinates, from the atlas table: a stable sort, as the release's
``sorted(range(R), key=Y)``), the window length (200, the release's ``num_timepoints_per_voxel``) and the input scale
(``max_val_to_scale`` 5.6430855, from the release's tutorial). Keys are read in transformers 4's names (how the
release was saved: ``vit.encoder.layer.N.attention.attention.query``) or transformers 5's (``vit.layers.N.attention
.q_proj``), for a folder re-saved by a newer version.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from brainlm.exceptions import CheckpointError
from brainlm.model.convert import Conversion, _require, check_keys, convert_brainlm, read_state, release_config
from brainlm.model.vitmae import RELEASE_INPUT_SCALE, ImageMAE, ImageMAEConfig, sincos_2d

RELEASE_TIMEPOINTS = 200

# transformers 5 names -> the release's (transformers 4) names.
_NEW_NAMES = [
    (r"^vit\.layers\.(\d+)\.", r"vit.encoder.layer.\1."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]

CHECKED = {
    "vit.embeddings.position_embeddings": "the fixed 2-D sin-cos positions (recomputed; checked to match)",
    "decoder.decoder_pos_embed": "the decoder's fixed 2-D sin-cos positions (recomputed; checked to match)",
}


def release_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state with transformers 5 key names turned into the release's transformers 4 names."""
    out = {}
    for key, value in state.items():
        for pattern, repl in _NEW_NAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def is_vitmae(hf: dict) -> bool:
    return "ViTMAEForPreTraining" in (hf.get("architectures") or []) or hf.get("model_type") == "vit_mae"


def model_config(hf: dict, path: Path, parcel_order: list[int], num_timepoints: int) -> ImageMAEConfig:
    """Our ImageMAEConfig for a released ViTMAEForPreTraining config.json; what we cannot run is an error."""
    where = f"{path}/config.json"
    _require(is_vitmae(hf), f"{where}: expected a ViTMAEForPreTraining config (model_type vit_mae)")
    _require(hf.get("hidden_act", "gelu") == "gelu", f"{where}: hidden_act {hf.get('hidden_act')!r}; only 'gelu'")
    _require(hf.get("qkv_bias", True), f"{where}: qkv_bias false is not supported")
    _require(
        not hf.get("norm_pix_loss", False),
        f"{where}: norm_pix_loss true (per-row normalised targets) is not reproduced by this importer",
    )
    size, patch = (_side(hf, key, default, where) for key, default in (("image_size", 224), ("patch_size", 16)))
    return ImageMAEConfig(
        num_parcels=len(parcel_order),
        num_timepoints=num_timepoints,
        image_size=size,
        patch_size=patch,
        hidden_size=int(hf.get("hidden_size", 768)),
        num_layers=int(hf.get("num_hidden_layers", 12)),
        num_heads=int(hf.get("num_attention_heads", 12)),
        intermediate_size=int(hf.get("intermediate_size", 3072)),
        decoder_hidden_size=int(hf.get("decoder_hidden_size", 512)),
        decoder_num_layers=int(hf.get("decoder_num_hidden_layers", 8)),
        decoder_num_heads=int(hf.get("decoder_num_attention_heads", 16)),
        decoder_intermediate_size=int(hf.get("decoder_intermediate_size", 2048)),
        mask_ratio=float(hf.get("mask_ratio", 0.75)),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        parcel_order=parcel_order,
    )


def _side(hf: dict, key: str, default: int, where: str) -> int:
    """A square's side from config.json's int or [height, width]; a non-square one is an error."""
    value = hf.get(key, default)
    sides = {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}
    _require(len(sides) == 1, f"{where}: {key} {value}: only square images and patches are supported")
    return sides.pop()


def _block_keys(ours: str, theirs: str) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for p in ("weight", "bias"):
        out[f"{ours}.attn.qkv.{p}"] = tuple(f"{theirs}.attention.attention.{n}.{p}" for n in ("query", "key", "value"))
        out[f"{ours}.attn.proj.{p}"] = (f"{theirs}.attention.output.dense.{p}",)
        out[f"{ours}.norm1.{p}"] = (f"{theirs}.layernorm_before.{p}",)
        out[f"{ours}.norm2.{p}"] = (f"{theirs}.layernorm_after.{p}",)
        out[f"{ours}.mlp.fc1.{p}"] = (f"{theirs}.intermediate.dense.{p}",)
        out[f"{ours}.mlp.fc2.{p}"] = (f"{theirs}.output.dense.{p}",)
    return out


def key_map(config: ImageMAEConfig) -> dict[str, tuple[str, ...]]:
    """Every key of our state dict -> the release key(s) (transformers 4 names) it is made from."""
    m: dict[str, tuple[str, ...]] = {"cls_token": ("vit.embeddings.cls_token",), "mask_token": ("decoder.mask_token",)}
    for p in ("weight", "bias"):
        m[f"patch_embed.{p}"] = (f"vit.embeddings.patch_embeddings.projection.{p}",)
        m[f"norm.{p}"] = (f"vit.layernorm.{p}",)
        m[f"decoder_embed.{p}"] = (f"decoder.decoder_embed.{p}",)
        m[f"decoder_norm.{p}"] = (f"decoder.decoder_norm.{p}",)
        m[f"decoder_pred.{p}"] = (f"decoder.decoder_pred.{p}",)
    for i in range(config.num_layers):
        m |= _block_keys(f"blocks.{i}", f"vit.encoder.layer.{i}")
    for j in range(config.decoder_num_layers):
        m |= _block_keys(f"decoder_blocks.{j}", f"decoder.decoder_layers.{j}")
    return m


def release_tensor(key: str, tensors: list[Tensor], config: ImageMAEConfig) -> Tensor:
    """One of our tensors from the release's: the fused qkv, and the channels folded (3 identical input channels:
    the patch weights summed over them; the head's 3 channel outputs averaged, as the release averages them)."""
    Q = config.patch_size**2
    if len(tensors) > 1:
        return torch.cat(tensors, dim=0)
    t = tensors[0]
    if key == "patch_embed.weight":  # Conv2d [D, C, p, p] -> Linear [D, p * p]
        return t.sum(dim=1).reshape(t.shape[0], Q)
    if key in ("decoder_pred.weight", "decoder_pred.bias"):  # rows (p, q, c), c last -> mean over c
        C = t.shape[0] // Q
        return t.reshape(Q, C, *t.shape[1:]).mean(dim=1)
    return t


def _check_positions(state: dict[str, Tensor], key: str, grid: int, width: int) -> None:
    if key not in state:
        return
    ours, theirs = sincos_2d(grid, width), state[key].reshape(-1, width).float()
    _require(theirs.shape == ours.shape, f"{key} has shape {tuple(theirs.shape)}; expected {tuple(ours.shape)}")
    _require(
        torch.allclose(theirs, ours, atol=1e-5),
        f"{key} is not the 2-D sin-cos table this importer recomputes (max difference "
        f"{(theirs - ours).abs().max().item():.3g})",
    )


def y_order(coords_R3: np.ndarray) -> list[int]:
    """Parcels sorted by their Y coordinate, ties in index order: the release's image rows."""
    return [int(i) for i in np.argsort(np.asarray(coords_R3)[:, 1], kind="stable")]


def convert_vitmae(src: str | Path, coords_R3: np.ndarray, num_timepoints: int = RELEASE_TIMEPOINTS) -> Conversion:
    """Read a ViTMAEForPreTraining folder into an ImageMAE in eval mode; the atlas's coordinates give the row order.
    Every key is accounted for: a missing or unexpected one is an error that names it."""
    path = Path(src)
    hf = release_config(path)
    config = model_config(hf, path, y_order(coords_R3), int(hf.get("num_timepoints_per_voxel") or num_timepoints))
    state = release_names(read_state(path))
    mapping = key_map(config)
    check_keys(path, state, mapping, CHECKED)
    _check_positions(state, "vit.embeddings.position_embeddings", config.grid, config.hidden_size)
    _check_positions(state, "decoder.decoder_pos_embed", config.grid, config.decoder_hidden_size)
    ours = {
        k: release_tensor(k, [state[s].float() for s in sources], config).contiguous() for k, sources in mapping.items()
    }
    with torch.device("meta"):
        model = ImageMAE(config)
    try:
        model.load_state_dict(ours, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the converted weights do not fit the model its config describes: {err}") from (
            err
        )
    model.fixed_buffers(torch.device("cpu"))
    channels = state["vit.embeddings.patch_embeddings.projection.weight"].shape[1]
    notes = [
        "The release does not record the normalisation of its training data: inputs are scaled by our robust "
        "scaling ((x - median) / IQR per parcel, fitted on your training recordings), then divided by "
        f"{RELEASE_INPUT_SCALE} inside the model (the release tutorial's max_val_to_scale); outputs are multiplied "
        "back.",
        f"Image rows: the atlas's {config.num_parcels} parcels sorted by their Y coordinate (what the release's "
        f"tutorial does), padded with {config.pad_value:g} to {config.image_size} x {config.image_size}, as its "
        "training code pads.",
        f"The {channels} identical input channels are folded: the patch projection's weights are summed over them "
        "and the head's channel outputs averaged (what the release does with its prediction).",
        "Visible patches enter the encoder in index order (the release shuffles them; attention does not see order, "
        "so latents and predictions are the same up to that order).",
        "Training-time dropout is not carried: the converted model is for inference and fine-tuning.",
    ]
    params = model.num_params()
    source = {
        "format": "ViTMAEForPreTraining",
        "path": str(path.resolve()),
        "params": params,
        "params_millions": round(params / 1e6, 2),
        "transformers_version": hf.get("transformers_version"),
        "release_mask_ratio": hf.get("mask_ratio"),
    }
    return Conversion(model.eval(), source, {k: CHECKED[k] for k in state if k in CHECKED}, notes)


def convert_release(src: str | Path, coords_R3: np.ndarray | None = None) -> Conversion:
    """Either release format, by its config.json: BrainLMForPretraining (``convert_brainlm``: old_13M) or
    ViTMAEForPreTraining (``convert_vitmae``: the 111M and 650M releases, which need the atlas's coordinates: they
    order the image rows)."""
    path = Path(src)
    if not is_vitmae(release_config(path)):
        return convert_brainlm(path)
    if coords_R3 is None:
        raise CheckpointError(
            f"{path} is a ViT-MAE release (ViTMAEForPreTraining): it needs the atlas it was trained on, whose Y "
            "coordinates order its image rows; pass --atlas-table A424.tsv (docs/pretrained.md says how to make it)"
        )
    return convert_vitmae(path, coords_R3)
