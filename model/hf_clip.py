"""Hugging Face CLIP <-> open_clip: architecture configs and weights.

The official SSN code builds its backbone from Hugging Face ``transformers`` CLIP towers
(``CLIPTextModelWithProjection`` / ``CLIPVisionModelWithProjection``); this project runs open_clip.  The
two implement the same network (pre-norm ViT blocks, causal text attention pooled at the end-of-text
token, bias-free projections), so a Hugging Face ``CLIPConfig`` maps to an open_clip model config and
Hugging Face weights map to an open_clip state dict, tensor for tensor.

Hugging Face (``text_model.`` / ``vision_model.``)  ->  open_clip (text at top level / ``visual.``):

* ``embeddings.token_embedding.weight`` -> ``token_embedding.weight``
* ``embeddings.position_embedding.weight`` -> ``positional_embedding`` / ``visual.positional_embedding``
* ``embeddings.class_embedding`` -> ``visual.class_embedding``
* ``embeddings.patch_embedding.weight`` -> ``visual.conv1.weight``
* ``pre_layrnorm`` / ``post_layernorm`` -> ``visual.ln_pre`` / ``visual.ln_post``; ``final_layer_norm`` -> ``ln_final``
* ``encoder.layers.i.layer_norm1`` / ``layer_norm2`` -> ``transformer.resblocks.i.ln_1`` / ``ln_2``
* ``encoder.layers.i.self_attn.{q,k,v}_proj`` -> ``...attn.in_proj_weight`` / ``in_proj_bias`` (q, k, v stacked)
* ``encoder.layers.i.self_attn.out_proj`` -> ``...attn.out_proj``
* ``encoder.layers.i.mlp.fc1`` / ``fc2`` -> ``...mlp.c_fc`` / ``mlp.c_proj``
* ``text_projection.weight`` [D, w] -> ``text_projection`` [w, D]; ``visual_projection.weight`` [D, w] ->
  ``visual.proj`` [w, D] (transposed: Hugging Face keeps bias-free ``nn.Linear`` layers, open_clip matrices)
* ``logit_scale`` -> ``logit_scale`` (both store log s)

The official SSN checkpoint nests the towers as ``clip_text_model.`` and ``clip_vision_model.``; those
prefixes are removed first.  ``hidden_act`` ``quick_gelu`` (``x·σ(1.702x)``, OpenAI's) becomes
open_clip's ``quick_gelu``, ``gelu`` its exact ``nn.GELU``.

An open_clip model config made here is registered with open_clip under a name derived from its content
(``hf-clip-<digest>``), so ``open_clip.create_model`` / ``get_tokenizer`` build it like any shipped config,
and a checkpoint that stores the config dict rebuilds it without the Hugging Face directory.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import Tensor

from utils import UserError

CONFIG_FILE = "config.json"
# Single-file weights first; a sharded checkpoint is read through its index.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
CLIP_VOCAB_SIZE = 49408  # CLIP's byte-level BPE, the vocabulary of open_clip's tokenizer
CLIP_EOT_IDS = (2, 49407)  # Hugging Face pools at argmax(ids) for the legacy id 2, else at the first 49407
OFFICIAL_PREFIXES = ("clip_text_model.", "clip_vision_model.")
NAME_PREFIX = "hf-clip-"
ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # hidden_act -> open_clip quick_gelu

# Hugging Face encoder-layer module -> open_clip residual-block module.
_LAYER_MODULES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_TOWER_KEYS = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
_PROJECTIONS = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}
_TOWER_BLOCKS = {"text_model.": "transformer.resblocks.", "vision_model.": "visual.transformer.resblocks."}
_LAYER_KEY = re.compile(r"^(text_model\.|vision_model\.)encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# Buffers older transformers versions saved (4.26.1, the official code's pin); recomputed, never learned.
_IGNORED_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

# Hugging Face configs of OpenAI's CLIP releases, keyed by what their weights' shapes show:
# (vision width, vision layers, patch, image size, text width, text layers, embed dim).
# All use 64-wide heads, 4x MLPs, QuickGELU and the 77-token BPE text tower.
OPENAI_SIZES = {
    (768, 12, 32, 224, 512, 12, 512): "openai/clip-vit-base-patch32",
    (768, 12, 16, 224, 512, 12, 512): "openai/clip-vit-base-patch16",
    (1024, 24, 14, 224, 768, 12, 768): "openai/clip-vit-large-patch14",
    (1024, 24, 14, 336, 768, 12, 768): "openai/clip-vit-large-patch14-336",
}


class HFCLIPError(UserError, ValueError):
    """A Hugging Face CLIP config or weights file that cannot be read as a CLIP model."""


# ---------------------------------------------------------------------------------------------- config
def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The ``CLIPConfig`` dict of ``config.json`` (a directory holding it, or the file itself)."""
    path = Path(path)
    file = path / CONFIG_FILE if path.is_dir() else path
    if not file.is_file():
        raise HFCLIPError(f"{file}: no such file (a Hugging Face CLIP directory holds config.json and its weights)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFCLIPError(f"{file}: not a JSON file ({exc})") from exc
    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in ("text_config", "vision_config")):
        raise HFCLIPError(f"{file}: not a Hugging Face CLIPConfig (needs 'text_config' and 'vision_config' objects)")
    return config


def _field(config: Mapping[str, Any], key: str, source: str, where: str, default: Any = None) -> Any:
    value = config.get(key, default)
    if value is None:
        raise HFCLIPError(f"{source}: {where}{key} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise HFCLIPError(f"{source}: {where}{key} is {value!r}")
    return value


def _positive_int(config: Mapping[str, Any], key: str, source: str, where: str, default: int | None = None) -> int:
    value = _field(config, key, source, where, default)
    if not isinstance(value, int) or value <= 0:
        raise HFCLIPError(f"{source}: {where}{key} must be a positive integer, got {value!r}")
    return value


def _tower(config: Mapping[str, Any], source: str, where: str) -> dict[str, Any]:
    """The fields both towers share, checked: width, layers, heads, MLP ratio, LayerNorm eps, activation."""
    width = _positive_int(config, "hidden_size", source, where)
    heads = _positive_int(config, "num_attention_heads", source, where)
    layers = _positive_int(config, "num_hidden_layers", source, where)
    mlp_width = _positive_int(config, "intermediate_size", source, where)
    if width % heads:
        raise HFCLIPError(f"{source}: {where}hidden_size {width} is not divisible by num_attention_heads {heads}")
    mlp_ratio = mlp_width / width
    if int(width * mlp_ratio) != mlp_width:  # open_clip builds int(width * mlp_ratio) hidden units
        raise HFCLIPError(f"{source}: {where}intermediate_size {mlp_width} is not representable as an open_clip mlp_ratio")
    act = _field(config, "hidden_act", source, where, "quick_gelu")
    if act not in ACTIVATIONS:
        raise HFCLIPError(f"{source}: {where}hidden_act {act!r} is not supported (choose from {sorted(ACTIVATIONS)})")
    eps = float(_field(config, "layer_norm_eps", source, where, 1e-5))
    return {"width": width, "heads": heads, "layers": layers, "mlp_ratio": mlp_ratio, "quick_gelu": ACTIVATIONS[act],
            "norm_kwargs": {"eps": eps}}


def open_clip_model_config(hf_config: Mapping[str, Any], source: str = CONFIG_FILE) -> dict[str, Any]:
    """A Hugging Face ``CLIPConfig`` dict -> the open_clip model config of the same network.

    Text: ``hidden_size`` -> width, ``num_attention_heads`` -> heads, ``num_hidden_layers`` -> layers,
    ``intermediate_size / hidden_size`` -> mlp_ratio, ``max_position_embeddings`` -> context_length,
    ``vocab_size``.  Vision: the same plus ``patch_size``, ``image_size`` and head_width = width / heads.
    ``projection_dim`` -> embed_dim; ``layer_norm_eps`` -> the LayerNorms' eps; ``hidden_act`` -> quick_gelu.

    Raises:
        HFCLIPError: naming ``source`` and the field, for anything open_clip cannot build identically
            (towers with different activations or projection sizes, another vocabulary, ...).
    """
    text = _tower(hf_config["text_config"], source, "text_config.")
    vision = _tower(hf_config["vision_config"], source, "vision_config.")
    if text["quick_gelu"] != vision["quick_gelu"]:
        raise HFCLIPError(f"{source}: text and vision towers use different hidden_act; open_clip has one activation")
    embed_dim = _positive_int(hf_config, "projection_dim", source, "")
    for tower in ("text_config", "vision_config"):
        # The towers' own value is what CLIP{Text,Vision}ModelWithProjection (the official SSN code) use.
        own = hf_config[tower].get("projection_dim", embed_dim)
        if own != embed_dim:
            raise HFCLIPError(f"{source}: {tower}.projection_dim {own} differs from projection_dim {embed_dim}; "
                              "set both to the projection size of the weights")
    vocab_size = _positive_int(hf_config["text_config"], "vocab_size", source, "text_config.", CLIP_VOCAB_SIZE)
    if vocab_size != CLIP_VOCAB_SIZE:
        raise HFCLIPError(f"{source}: text_config.vocab_size {vocab_size} is not CLIP's BPE vocabulary ({CLIP_VOCAB_SIZE}), "
                          "the one open_clip's tokenizer produces")
    eos = hf_config["text_config"].get("eos_token_id", CLIP_EOT_IDS[1])
    if eos not in CLIP_EOT_IDS:
        raise HFCLIPError(f"{source}: text_config.eos_token_id {eos!r} is not CLIP's end-of-text token; "
                          "open_clip pools the text at the end-of-text token 49407")
    num_channels = hf_config["vision_config"].get("num_channels", 3)
    if num_channels != 3:
        raise HFCLIPError(f"{source}: vision_config.num_channels {num_channels!r}; open_clip's ViT takes RGB images")
    return {
        "embed_dim": embed_dim,
        "quick_gelu": text["quick_gelu"],
        "vision_cfg": {
            "image_size": _positive_int(hf_config["vision_config"], "image_size", source, "vision_config.", 224),
            "patch_size": _positive_int(hf_config["vision_config"], "patch_size", source, "vision_config.", 32),
            "width": vision["width"],
            "layers": vision["layers"],
            "head_width": vision["width"] // vision["heads"],
            "mlp_ratio": vision["mlp_ratio"],
            "norm_kwargs": vision["norm_kwargs"],
        },
        "text_cfg": {
            "context_length": _positive_int(hf_config["text_config"], "max_position_embeddings", source, "text_config.", 77),
            "vocab_size": vocab_size,
            "width": text["width"],
            "heads": text["heads"],
            "layers": text["layers"],
            "mlp_ratio": text["mlp_ratio"],
            "norm_kwargs": text["norm_kwargs"],
        },
    }


def model_config_name(model_cfg: Mapping[str, Any]) -> str:
    """The open_clip name of a config made by :func:`open_clip_model_config`: ``hf-clip-<digest>``, a hash of
    its content, so the same architecture always gets the same name."""
    digest = hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()
    return f"{NAME_PREFIX}{digest[:12]}"


def register_model_config(model_cfg: Mapping[str, Any], name: str | None = None) -> str:
    """Make ``model_cfg`` an open_clip model name (for ``create_model``, ``get_tokenizer``); returns the name.

    ``name`` (e.g. read back from a checkpoint) must be the config's own :func:`model_config_name`.
    open_clip reads configs from JSON files only (``add_model_config``), so the dict is added to its
    registry directly; registering the same config again is a no-op.
    """
    expected = model_config_name(model_cfg)
    if name is not None and name != expected:
        raise HFCLIPError(f"model name {name!r} does not match its stored open_clip config (expected {expected!r})")
    open_clip.factory._MODEL_CONFIGS[expected] = json.loads(json.dumps(model_cfg))  # a private deep copy
    return expected


def registered_config(model_name: str) -> dict[str, Any] | None:
    """The open_clip config of a name made by :func:`register_model_config`; None for other names."""
    if not model_name.startswith(NAME_PREFIX):
        return None
    return open_clip.get_model_config(model_name)


def openai_hf_config(hf_state: Mapping[str, Tensor], source: str) -> dict[str, Any]:
    """The Hugging Face config of OpenAI's CLIP release whose shapes ``hf_state`` has.

    Head counts and the activation cannot be read from weights; OpenAI's ViT-B/32, B/16, L/14 and
    L/14-336 all use 64-wide heads and QuickGELU, so for those sizes the config is known.  ``hf_state``
    holds Hugging Face keys (official ``clip_*_model.`` prefixes allowed).
    """
    state = strip_official_prefixes(hf_state)

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise HFCLIPError(f"{source}: no {key} weight; not a Hugging Face CLIP state dict")
        return tuple(state[key].shape)

    def layers(tower: str) -> int:
        found = {int(m.group(2)) for key in state if (m := _LAYER_KEY.match(key)) and m.group(1) == tower}
        return max(found) + 1 if found else 0

    vision_width = shape("vision_model.embeddings.class_embedding")[0]
    patch = shape("vision_model.embeddings.patch_embedding.weight")[-1]
    image = round(math.sqrt(shape("vision_model.embeddings.position_embedding.weight")[0] - 1)) * patch
    text_width = shape("text_model.embeddings.token_embedding.weight")[1]
    embed_dim = shape("text_projection.weight")[0]
    size = (vision_width, layers("vision_model."), patch, image, text_width, layers("text_model."), embed_dim)
    if size not in OPENAI_SIZES:
        raise HFCLIPError(
            f"{source}: the weights (vision width/layers/patch/image {size[:4]}, text width/layers {size[4:6]}, "
            f"embed {embed_dim}) are not one of OpenAI's CLIP sizes ({', '.join(OPENAI_SIZES.values())}); "
            "pass the model's config.json"
        )

    def tower(width: int, layer_count: int) -> dict[str, Any]:
        return {"hidden_size": width, "num_hidden_layers": layer_count, "num_attention_heads": width // 64,
                "intermediate_size": 4 * width, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                "projection_dim": embed_dim}

    return {
        "_name_or_path": OPENAI_SIZES[size],
        "projection_dim": embed_dim,
        "text_config": {**tower(text_width, size[5]), "vocab_size": CLIP_VOCAB_SIZE, "max_position_embeddings": 77},
        "vision_config": {**tower(vision_width, size[1]), "patch_size": patch, "image_size": image},
    }


# ---------------------------------------------------------------------------------------------- weights
def strip_official_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the official SSN nesting (``clip_text_model.`` / ``clip_vision_model.``) from tower keys."""
    return {next((key[len(p):] for p in OFFICIAL_PREFIXES if key.startswith(p)), key): value
            for key, value in state.items()}


def hf_to_open_clip_state_dict(hf_state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Hugging Face CLIP weights -> an open_clip ``CLIP`` state dict (table in the module docstring).

    ``hf_state`` may use ``CLIPModel`` keys or the official SSN's ``clip_*_model.`` prefixes.  A missing
    ``logit_scale`` (the official towers have none; retrieval does not use it) is set to open_clip's
    initial value ``log(1/0.07)``.  Unknown keys and incomplete q/k/v triples raise :class:`HFCLIPError`.
    """
    state = strip_official_prefixes(hf_state)
    converted: dict[str, Tensor] = {}
    qkv: dict[tuple[str, int, str], dict[str, Tensor]] = {}
    unknown = []
    for key, value in state.items():
        if key in _IGNORED_KEYS:
            continue
        if key in _TOWER_KEYS:
            converted[_TOWER_KEYS[key]] = value
        elif key in _PROJECTIONS:
            converted[_PROJECTIONS[key]] = value.T.contiguous()
        elif (match := _LAYER_KEY.match(key)) is not None:
            tower, index, module, kind = match.group(1), int(match.group(2)), match.group(3), match.group(4)
            block = f"{_TOWER_BLOCKS[tower]}{index}."
            if module in _QKV:
                qkv.setdefault((tower, index, kind), {})[module] = value
            elif module in _LAYER_MODULES:
                converted[f"{block}{_LAYER_MODULES[module]}.{kind}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise HFCLIPError(f"{source}: {len(unknown)} weight(s) that are not Hugging Face CLIP's, e.g. {sorted(unknown)[:5]}")
    for (tower, index, kind), parts in sorted(qkv.items()):
        missing = [name for name in _QKV if name not in parts]
        if missing:
            raise HFCLIPError(f"{source}: {tower}encoder.layers.{index} lacks {', '.join(m + '.' + kind for m in missing)}")
        converted[f"{_TOWER_BLOCKS[tower]}{index}.attn.in_proj_{kind}"] = torch.cat([parts[name] for name in _QKV])
    converted.setdefault("logit_scale", torch.tensor(math.log(1 / 0.07)))
    return converted


def expected_shapes(model_cfg: Mapping[str, Any]) -> dict[str, torch.Size]:
    """Parameter shapes of the open_clip ``CLIP`` built from ``model_cfg`` (on the meta device: no memory)."""
    with torch.device("meta"):
        model = open_clip.CLIP(**json.loads(json.dumps(model_cfg)))
    return {key: value.shape for key, value in model.state_dict().items()}


def check_fits(state: Mapping[str, Tensor], model_cfg: Mapping[str, Any], source: str, max_listed: int = 4) -> None:
    """Raise :class:`HFCLIPError` naming the weights that are missing, unexpected or shaped differently from
    the network ``model_cfg`` describes."""
    shapes = expected_shapes(model_cfg)
    problems = [f"{key} {tuple(value.shape)} (config: {tuple(shapes[key])})"
                for key, value in state.items() if key in shapes and value.shape != shapes[key]]
    missing = [key for key in shapes if key not in state]
    unexpected = [key for key in state if key not in shapes]
    if missing:
        problems.append(f"{len(missing)} missing, e.g. {missing[:max_listed]}")
    if unexpected:
        problems.append(f"{len(unexpected)} more than the config has, e.g. {unexpected[:max_listed]}")
    if problems:
        shown = problems[:max_listed] + ([f"... {len(problems) - max_listed} more"] if len(problems) > max_listed else [])
        raise HFCLIPError(f"{source}: the weights do not fit the config: " + "; ".join(shown))


def _weight_files(directory: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return [directory / name]
    for name in INDEX_FILES:
        index = directory / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                return [directory / shard for shard in sorted(set(weight_map.values()))]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise HFCLIPError(f"{index}: not a Hugging Face weight index ({exc!r})") from exc
    raise HFCLIPError(f"{directory}: no weights ({' or '.join(WEIGHT_FILES + INDEX_FILES)})")


def _read_weights(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise HFCLIPError(f"{file}: no such file")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except OSError:
        raise  # unreadable file: not a statement about its contents
    except Exception as exc:  # a damaged file fails anywhere in the reader
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HFCLIPError(f"{file}: corrupt or not a weights file ({first_line})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise HFCLIPError(f"{file}: not a state dict of tensors")
    return state


def read_hf_weights(directory: str | Path) -> dict[str, Tensor]:
    """The Hugging Face state dict of a CLIP directory (``model.safetensors``, ``pytorch_model.bin`` or a
    sharded checkpoint's index)."""
    state: dict[str, Tensor] = {}
    for file in _weight_files(Path(directory)):
        state.update(_read_weights(file))
    return state


def is_hf_clip_dir(path: str | Path | None) -> bool:
    """True for a directory: the only directories given as pretrained weights are Hugging Face CLIP ones
    (:func:`load_hf_clip_dir` names what such a directory lacks)."""
    return bool(path) and Path(path).is_dir()


def load_hf_clip_dir(directory: str | Path) -> tuple[str, dict[str, Tensor]]:
    """A Hugging Face CLIP directory -> (registered open_clip model name, open_clip state dict).

    The architecture comes from ``config.json`` (:func:`open_clip_model_config`), the weights from
    ``model.safetensors`` / ``pytorch_model.bin``; both are checked against each other.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise HFCLIPError(f"{directory}: not a directory")
    config_file = directory / CONFIG_FILE
    model_cfg = open_clip_model_config(read_hf_config(config_file), str(config_file))
    state = hf_to_open_clip_state_dict(read_hf_weights(directory), str(directory))
    check_fits(state, model_cfg, f"{directory} (config.json and weights)")
    return register_model_config(model_cfg), state
