"""kohya sd-scripts' SDXL module names, computed from a diffusers UNet config.

kohya trains SD 1.x on diffusers' UNet, so its SD 1.x files name modules by their diffusers paths
(`lora_unet_down_blocks_0_attentions_0_…`, what `export.kohya_state_dict` writes for SD 1.x). It trains SDXL on its
own UNet, laid out as Stability's original (SGM/LDM) checkpoint, and its SDXL files use those names:
`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `lora_unet_middle_block_1_…`,
`lora_unet_output_blocks_2_0_in_layers_2`, with the text encoders as `lora_te1_…` (CLIP ViT-L) and `lora_te2_…`
(OpenCLIP bigG, in its transformers names: `lora_te2_text_model_encoder_layers_0_self_attn_q_proj`). A1111/Forge and
ComfyUI look SDXL kohya keys up by these names; diffusers' kohya converter maps them back with the UNet config's
`layers_per_block`.

The LDM layout of a UNet whose level i has L_i layers per block (facts read in kohya's `sdxl_original_unet.py` and
diffusers' `_maybe_map_sgm_blocks_to_diffusers`; for SDXL L_i = 2):
- `input_blocks.0.0` is conv_in; down level i, layer j is `input_blocks.{1 + Σ_{k<i}(L_k + 1) + j}`, its resnet at
  `.0` and its attention at `.1`; the level's downsampler is the next index, `input_blocks.{…}.0.op`;
- `middle_block.0`, `.1`, `.2`: the mid block's first resnet, its attention, its second resnet;
- up level i (L_i + 1 layers; levels counted from the bottom, as diffusers' `up_blocks`), layer j is
  `output_blocks.{Σ_{k<i}(L'_k + 1) + j}`, resnet `.0`, attention `.1`; the upsampler belongs to the level's last
  layer, after its attention (`.2.conv`) or, on a level without attention, after its resnet (`.1.conv`);
- inside a resnet: `in_layers.0` norm1, `in_layers.2` conv1, `emb_layers.1` time_emb_proj, `out_layers.0` norm2,
  `out_layers.3` conv2, `skip_connection` conv_shortcut; attention (transformer) internals keep diffusers' names;
- `time_embed.0`/`.2` (time_embedding.linear_1/2), `label_emb.0.0`/`.0.2` (SDXL's add_embedding.linear_1/2),
  `out.0` (conv_norm_out), `out.2` (conv_out).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from dreamlora.methods.base import ExportUnsupported

SDXL_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
# kohya's header value for SDXL base models; A1111 shows a LoRA under an SDXL checkpoint only when this starts
# with "sdxl_" (any other kohya header reads as SD 1.x there, and A1111 hides it from SDXL users by default).
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"

DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # block type -> has attentions
UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
MID_TYPES = {"UNetMidBlock2DCrossAttn"}
RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP_LEVEL = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
BLOCK_PATH = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(\..+)?")
MID_PATH = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)(\..+)?")


class NoKohyaName(ExportUnsupported):
    """A module of the UNet has no name in kohya's SDXL (LDM) layout: the kohya file is skipped, with this reason,
    and the other files are still written (`export.write_tool_files`)."""


def is_sd2_layout(config: Mapping | None) -> bool:
    """Whether a diffusers UNet config is SD 2.x's family: linear projections in and out of its transformers
    (SD 1.x's are 1×1 convolutions; kohya builds its UNet the same way when told `--v2`), and no SDXL
    micro-conditioning."""
    return config is not None and bool(dict(config).get("use_linear_projection")) and not is_sdxl_layout(config)


def sd2_header(prediction_type: str | None) -> dict[str, str]:
    """kohya's header entries for an SD 2.x base: `ss_v2` (A1111 lists the LoRA under SD 2.x checkpoints only with
    it: any other kohya header reads as SD 1.x there and is hidden from SD 2.x users by default) and
    `ss_base_model_version` as kohya spells it (`sd_v2`, `sd_v2_v` for a v-prediction base)."""
    return {"ss_v2": "True", "ss_base_model_version": "sd_v2_v" if prediction_type == "v_prediction" else "sd_v2"}


def is_sdxl_layout(config: Mapping | None) -> bool:
    """Whether a diffusers UNet config is SDXL's family (micro-conditioning on text and time ids): the UNets kohya
    trains, and names, in the LDM layout."""
    return config is not None and dict(config).get("addition_embed_type") == "text_time"


def ldm_unet_path(path: str, config: Mapping) -> str:
    """The LDM module path (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`) of a diffusers UNet module path
    (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`) for a UNet built from `config`. Raises
    `NoKohyaName` for a module or block type the LDM layout has no name for."""
    config = dict(config)
    for diffusers_name, ldm_name in TOP_LEVEL.items():
        if path == diffusers_name or path.startswith(diffusers_name + "."):
            return ldm_name + path[len(diffusers_name):]
    if match := BLOCK_PATH.fullmatch(path):
        side, level, part, index, rest = match.groups()
        return _block_path(config, side, int(level), part, int(index), rest or "", path)
    if match := MID_PATH.fullmatch(path):
        part, index, rest = match.groups()
        if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in MID_TYPES:
            raise NoKohyaName(f"{path}: mid block {config.get('mid_block_type')} has no kohya SDXL name")
        position = 2 * int(index) + (part == "attentions")  # resnet, attention, resnet
        return f"middle_block.{position}" + _inner(part, rest or "", path)
    raise NoKohyaName(f"{path}: no kohya SDXL (LDM) name for this UNet module")


def _block_path(config: dict, side: str, level: int, part: str, index: int, rest: str, path: str) -> str:
    down = side == "down_blocks"
    types = config["down_block_types" if down else "up_block_types"]
    known = DOWN_TYPES if down else UP_TYPES
    if types[level] not in known:
        raise NoKohyaName(f"{path}: block type {types[level]} has no kohya SDXL name")
    layers = _layers_per_level(config["layers_per_block"], len(types))
    if down:
        first = 1 + sum(n + 1 for n in layers[:level])  # input_blocks.0 is conv_in
        if part == "downsamplers":
            return f"input_blocks.{first + layers[level]}.0" + _inner("downsamplers", rest, path)
        return f"input_blocks.{first + index}.{int(part == 'attentions')}" + _inner(part, rest, path)
    up_layers = layers[::-1]  # diffusers' up_blocks count levels from the bottom, each one layer longer
    first = sum(n + 1 for n in up_layers[:level])
    if part == "upsamplers":
        # after the level's last layer's resnet, and its attention where the level has one
        return f"output_blocks.{first + up_layers[level]}.{2 if known[types[level]] else 1}" + _inner(part, rest, path)
    return f"output_blocks.{first + index}.{int(part == 'attentions')}" + _inner(part, rest, path)


def _layers_per_level(value, levels: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * levels


def _inner(part: str, rest: str, path: str) -> str:
    """The path inside a resnet, attention or sampler (`rest`: "" or ".conv1…")."""
    if part == "attentions" or not rest:
        return rest
    head, _, tail = rest[1:].partition(".")
    if part == "resnets":
        renamed = RESNET_PARTS.get(head)
    else:  # a sampler's one conv: `op` in a downsampler, `conv` in an upsampler
        renamed = {"conv": "op" if part == "downsamplers" else "conv"}.get(head)
    if renamed is None:
        raise NoKohyaName(f"{path}: no kohya SDXL (LDM) name for {head!r} in a {part[:-1]}")
    return f".{renamed}" + (f".{tail}" if tail else "")


def kohya_sdxl_unet_key(path: str, config: Mapping) -> str:
    """kohya's SDXL module key (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`) for a diffusers
    UNet module path."""
    return f"{SDXL_PREFIXES['unet']}_{ldm_unet_path(path, config).replace('.', '_')}"
