"""Read the released BrainLM weights (``BrainLMForPretraining``, e.g. the paper's 13M ``old_13M``) into our model.

The release is a Hugging Face folder: ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin`` (read with
``torch.load(weights_only=True)``: no code runs). What its model computes, and the option of ours that matches:

- post-LayerNorm BERT blocks (transformers' ``NystromformerLayer`` with ``num_landmarks == segment_means_seq_len``,
  the exact-softmax branch), eps 1e-12, GELU                                      -> block_norm post, layer_norm_eps
- a depthwise convolution over the token axis on the values, added to the attention -> value_conv_kernel
- the patch-index sinusoid interleaved (sin even, cos odd columns)                 -> temporal_layout interleaved
- raw MNI mm through Linear(3 -> D); ours divides by 100 first                     -> the weight is scaled by 100
- decoder head Linear(E -> E/2) -> LeakyReLU(0.1) -> Linear(E/2 -> P)              -> decoder_head mlp

Its masking keeps the visible tokens in random order, which the value convolution sees; ours keeps them in index
order (deterministic). Embeddings (no masking) and the decoder see the same order in both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from brainlm.exceptions import CheckpointError
from brainlm.model.config import ModelConfig
from brainlm.model.layers import sincos_1d
from brainlm.model.mae import COORD_SCALE_MM, BrainLM

# Keys of the release that carry nothing our model needs, and why.
UNUSED = {
    "vit.embeddings.pos_embedding.pe": "the fixed sinusoid buffer (recomputed; checked to match)",
    "decoder.pos_embedding.pe": "the decoder's fixed sinusoid buffer (recomputed; checked to match)",
    "decoder.decoder_pred.weight": "ViTMAEDecoder's own head, unused by BrainLM's forward",
    "decoder.decoder_pred.bias": "ViTMAEDecoder's own head, unused by BrainLM's forward",
}


@dataclass
class Conversion:
    """The converted model and what the conversion could and could not carry over."""

    model: BrainLM
    source: dict
    dropped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise CheckpointError(message)


def model_config(hf: dict, path: Path) -> ModelConfig:
    """Our ModelConfig for a released BrainLMForPretraining config.json; what we cannot run is an error."""
    where = f"{path}/config.json"
    _require(
        "BrainLMForPretraining" in (hf.get("architectures") or []) or hf.get("model_type") == "brainlm_mae",
        f"{where}: expected a BrainLMForPretraining config (model_type brainlm_mae), got "
        f"architectures={hf.get('architectures')!r}, model_type={hf.get('model_type')!r}",
    )
    _require(
        hf.get("hidden_act", "gelu") == "gelu",
        f"{where}: hidden_act {hf.get('hidden_act')!r}; only 'gelu' (exact) is supported",
    )
    _require(
        hf.get("num_landmarks") == hf.get("segment_means_seq_len"),
        f"{where}: num_landmarks {hf.get('num_landmarks')} != segment_means_seq_len {hf.get('segment_means_seq_len')}"
        ": that model uses the Nystrom approximation of attention, which this importer does not reproduce",
    )
    _require(not hf.get("use_tanh_decoder", False), f"{where}: use_tanh_decoder=true is not supported")
    _require(
        hf["hidden_size"] == hf["decoder_hidden_size"],
        f"{where}: hidden_size {hf['hidden_size']} != decoder_hidden_size {hf['decoder_hidden_size']}; the released "
        "decoder adds encoder-width position embeddings, so only equal widths run",
    )
    return ModelConfig(
        num_parcels=int(hf["num_brain_voxels"]),
        num_timepoints=int(hf["num_timepoints_per_voxel"]),
        patch_size=int(hf["timepoint_patching_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=int(hf["num_attention_heads"]),
        intermediate_size=int(hf["intermediate_size"]),
        decoder_hidden_size=int(hf["decoder_hidden_size"]),
        decoder_num_layers=int(hf["decoder_num_hidden_layers"]),
        decoder_num_heads=int(hf["decoder_num_attention_heads"]),
        decoder_intermediate_size=int(hf["decoder_intermediate_size"]),
        mask_ratio=float(hf.get("mask_ratio", 0.75)),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        block_norm="post",
        value_conv_kernel=int(hf.get("conv_kernel_size") or 0),
        temporal_layout="interleaved",
        decoder_head="mlp",
    )


def read_state(path: Path) -> dict[str, Tensor]:
    """The release's tensors: safetensors when present, else the .bin (weights only: no pickled code runs)."""
    from safetensors.torch import load_file

    for index_name, loader in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", lambda f: torch.load(f, map_location="cpu", weights_only=True)),
    ):
        index = path / index_name
        if index.is_file():  # sharded: one file per part
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for f in files for k, v in loader(path / f).items()}
    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    if (path / "pytorch_model.bin").is_file():
        try:
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(
                f"{path}/pytorch_model.bin could not be read as plain tensors ({type(err).__name__}: {err}); "
                "only weight files are read (weights_only=True)"
            ) from err
    raise CheckpointError(f"{path}: expected model.safetensors or pytorch_model.bin beside config.json")


def _block_keys(ours: str, theirs: str) -> dict[str, tuple[str, ...]]:
    """Our keys of one block -> the release's key(s) (three for the fused qkv)."""
    a = f"{theirs}.attention"
    out: dict[str, tuple[str, ...]] = {}
    for p in ("weight", "bias"):
        out[f"{ours}.attn.qkv.{p}"] = tuple(f"{a}.self.{n}.{p}" for n in ("query", "key", "value"))
        out[f"{ours}.attn.proj.{p}"] = (f"{a}.output.dense.{p}",)
        out[f"{ours}.norm1.{p}"] = (f"{a}.output.LayerNorm.{p}",)
        out[f"{ours}.mlp.fc1.{p}"] = (f"{theirs}.intermediate.dense.{p}",)
        out[f"{ours}.mlp.fc2.{p}"] = (f"{theirs}.output.dense.{p}",)
        out[f"{ours}.norm2.{p}"] = (f"{theirs}.output.LayerNorm.{p}",)
    out[f"{ours}.attn.value_conv.weight"] = (f"{a}.self.conv.weight",)
    return out


def key_map(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Every key of our state dict -> the release key(s) it is made from."""
    m: dict[str, tuple[str, ...]] = {"cls_token": ("vit.embeddings.cls_token",), "mask_token": ("decoder.mask_token",)}
    for p in ("weight", "bias"):
        m[f"patch_embed.{p}"] = (f"vit.embeddings.signal_embedding_projection.{p}",)
        m[f"spatial_embed.{p}"] = (f"vit.embeddings.xyz_embedding_projection.{p}",)
        m[f"norm.{p}"] = (f"vit.layernorm.{p}",)
        m[f"decoder_embed.{p}"] = (f"decoder.decoder_embed.{p}",)
        m[f"decoder_spatial_embed.{p}"] = (f"decoder.decoder_xyz_projection.{p}",)
        m[f"decoder_norm.{p}"] = (f"decoder.decoder_norm.{p}",)
        m[f"decoder_pred.0.{p}"] = (f"decoder.decoder_pred1.{p}",)
        m[f"decoder_pred.2.{p}"] = (f"decoder.decoder_pred2.{p}",)
    for i in range(config.num_layers):
        m |= _block_keys(f"blocks.{i}", f"vit.encoder.layer.{i}")
    for j in range(config.decoder_num_layers):
        m |= _block_keys(f"decoder_blocks.{j}", f"decoder.decoder_layers.{j}")
    if not config.value_conv_kernel:
        m = {k: v for k, v in m.items() if "value_conv" not in k}
    return m


def _check_sinusoid(state: dict[str, Tensor], key: str, num_patches: int, width: int) -> None:
    """The release's fixed buffer must be the interleaved sinusoid we recompute."""
    if key not in state:
        return
    ours = sincos_1d(torch.arange(num_patches), width, layout="interleaved")
    theirs = state[key][:num_patches].float()
    _require(
        theirs.shape == ours.shape and torch.allclose(theirs, ours, atol=1e-5),
        f"{key} is not the interleaved sin/cos encoding this importer recomputes (max difference "
        f"{(theirs - ours).abs().max().item() if theirs.shape == ours.shape else 'shape ' + str(tuple(theirs.shape))})",
    )


def check_keys(path: Path, state: dict[str, Tensor], mapping: dict[str, tuple[str, ...]], unused) -> None:
    """Every key of the release is mapped (``mapping``'s sources) or known to be unused; else an error naming it."""
    wanted = {k for keys in mapping.values() for k in keys}
    missing = sorted(k for k in wanted if k not in state)
    unexpected = sorted(k for k in state if k not in wanted and k not in unused)
    _require(not missing, f"{path}: missing key(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    _require(not unexpected, f"{path}: unexpected key(s) {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")


def release_config(path: Path) -> dict:
    """A release folder's config.json, or an error that says what is wrong with it."""
    _require((path / "config.json").is_file(), f"{path}: no config.json; expected a Hugging Face release folder")
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}/config.json is not valid JSON: {err}") from err


def convert_brainlm(src: str | Path) -> Conversion:
    """Read a BrainLMForPretraining folder into a BrainLM in eval mode. Every key is accounted for: unused ones are
    dropped and listed; a missing or unexpected one is an error that names it."""
    path = Path(src)
    hf = release_config(path)
    config = model_config(hf, path)
    state = read_state(path)
    mapping = key_map(config)
    check_keys(path, state, mapping, UNUSED)
    _check_sinusoid(state, "vit.embeddings.pos_embedding.pe", config.num_patches, config.hidden_size)
    _check_sinusoid(state, "decoder.pos_embedding.pe", config.num_patches, config.hidden_size)

    ours: dict[str, Tensor] = {}
    for key, sources in mapping.items():
        tensors = [state[s].float() for s in sources]
        tensor = torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0]
        if key in ("spatial_embed.weight", "decoder_spatial_embed.weight"):
            tensor = tensor * COORD_SCALE_MM  # theirs takes raw mm, ours mm / 100: the same function
        ours[key] = tensor.contiguous()
    with torch.device("meta"):
        model = BrainLM(config)
    try:
        model.load_state_dict(ours, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: the converted weights do not fit the model its config describes: {err}"
        ) from err
    notes = [
        "The release does not record the normalisation its training data had (the paper's scaling was computed as "
        "x - median / IQR, with statistics never published): inputs are scaled by our robust scaling "
        "((x - median) / IQR per parcel, fitted on your training recordings).",
        "Training-time dropout (attention probabilities "
        f"{hf.get('attention_probs_dropout_prob', 0)}, hidden {hf.get('hidden_dropout_prob', 0)}) is not carried: "
        "the converted model is for inference and fine-tuning with our dropout settings.",
        "Visible tokens enter the encoder in index order (the release shuffles them, which its value convolution "
        "sees): masked reconstructions differ from the release's by that order; embeddings (no masking) do not.",
    ]
    if hf.get("loss_fn", "mse") != "mse":
        notes.append(f"The release was trained with loss_fn {hf['loss_fn']!r}; ours trains with MSE.")
    dropped = {k: UNUSED[k] for k in state if k in UNUSED}
    params = model.num_params()
    source = {
        "format": "BrainLMForPretraining",
        "path": str(path.resolve()),
        "params": params,
        "params_millions": round(params / 1e6, 2),
        "transformers_version": hf.get("transformers_version"),
        "release_mask_ratio": hf.get("mask_ratio"),
    }
    return Conversion(model.eval(), source, dropped, notes)
