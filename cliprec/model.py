"""Loading CLIP (+ a trained LoRA adapter), adding LoRA, and turning texts/images into unit vectors.

Preprocessing is split in two on purpose: `image_pixels` runs the processor's resize + crop only and
returns uint8 (4x smaller to cache, cheap to ship to a GPU), `normalize_pixels` does its rescale +
normalise as one tensor op on the model's device. Together they equal `processor(images=...)` to ~1e-7.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPProcessor
from transformers.image_transforms import convert_to_rgb
from transformers.models.clip import CLIPImageProcessorPil

from cliprec.hub import CLIP_SETTING, hub_errors, pretrained_kwargs
from cliprec.precision import pick_device

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)

LOGIT_SCALE_FILE = "logit_scale.json"  # PEFT does not save CLIP's bare logit_scale Parameter
MAX_LOGIT_SCALE = math.log(100)  # CLIP's clamp: the temperature never goes below 1/100


def load_clip(
    name: str | Path,
    adapter: str | Path | None = None,
    device: str | torch.device | None = None,
    merge: bool = True,
) -> tuple[torch.nn.Module, CLIPProcessor]:
    """CLIP + processor from a hub id or local dir, optionally with a TRAINED LoRA adapter; eval mode.

    With `merge`, the adapter is folded into the weights (plain CLIPModel, no LoRA overhead).
    """
    path = Path(name)
    if not path.exists() and path.parent != Path() and path.parent.is_dir():
        # "models/demo-clip" also reads as a hub id: fail fast instead of a minute of network retries
        raise FileNotFoundError(f"model {name!r}: {path.parent}/ exists but has no {path.name!r}")
    kwargs = pretrained_kwargs(str(name), "CLIP", CLIP_SETTING)  # offline: one line, at once
    with hub_errors(str(name), "CLIP", CLIP_SETTING):
        model = CLIPModel.from_pretrained(str(name), use_safetensors=True, trust_remote_code=False, **kwargs)
        # backend="pil": torchvision is absent here, and one backend everywhere keeps pixels identical
        processor = CLIPProcessor.from_pretrained(str(name), backend="pil", **kwargs)
    if adapter is not None:
        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter} is not a trained LoRA adapter (no adapter_config.json)")
        from peft import PeftModel  # peft takes seconds to import: only the stages that use it pay

        with _quiet_peft():
            model = PeftModel.from_pretrained(model, str(adapter))
        scale_file = adapter / LOGIT_SCALE_FILE
        if scale_file.is_file():
            with torch.no_grad():
                clip_module(model).logit_scale.fill_(json.loads(scale_file.read_text())["logit_scale"])
        if merge:
            model = model.merge_and_unload()
    return model.to(pick_device(device)).eval(), processor


def add_lora(model: CLIPModel, lora_params: dict[str, Any], train_logit_scale: bool = False) -> PeftModel:
    """Wrap `model` in fresh LoRA adapters on both towers (params.yaml `lora:` block).

    CLIP's logit_scale stays frozen unless `train_logit_scale`; it is then a trainable bare Parameter
    that `save_adapter` writes next to the adapter (PEFT would drop it).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=int(lora_params["r"]),
        lora_alpha=int(lora_params["alpha"]),
        lora_dropout=float(lora_params["dropout"]),
        target_modules=list(lora_params["target_modules"]),
        bias="none",
    )
    with _quiet_peft():
        peft_model = get_peft_model(model, config)
    clip_module(peft_model).logit_scale.requires_grad_(train_logit_scale)
    return peft_model


def save_adapter(model: PeftModel, out_dir: str | Path) -> None:
    """PEFT save_pretrained (byte-reproducible), plus logit_scale.json when the temperature was trained."""
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    # PEFT writes target_modules from a set, in an order that changes with every process's hash seed:
    # sorted, the same adapter always gives the same file (and the same DVC hash downstream)
    config_file = out_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    logit_scale = clip_module(model).logit_scale
    if logit_scale.requires_grad:
        value = float(logit_scale.detach())
        (out_dir / LOGIT_SCALE_FILE).write_text(json.dumps({"logit_scale": value}) + "\n")


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    # PEFT 0.21 reads `is_gradient_checkpointing`, which transformers 5 deprecated: noise, not ours to fix
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def clip_module(model: torch.nn.Module) -> CLIPModel:
    """The CLIPModel inside a PeftModel / DDP wrapper (or `model` itself)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    peft = sys.modules.get("peft")  # not imported yet: `model` cannot be a PeftModel
    return model.get_base_model() if peft is not None and isinstance(model, peft.PeftModel) else model


def model_device(model: torch.nn.Module) -> torch.device:
    """Where `model`'s weights live."""
    return next(model.parameters()).device


def text_max_length(model: torch.nn.Module, processor: CLIPProcessor) -> int:
    """Longest token sequence both the tokenizer and the text tower accept (77 for OpenAI CLIP)."""
    return min(
        processor.tokenizer.model_max_length, clip_module(model).config.text_config.max_position_embeddings
    )


def tokenize(processor: CLIPProcessor, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """input_ids + attention_mask, padded to the longest text, truncated to `max_length`."""
    return processor.tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )


def image_pixels(processor: CLIPProcessor, images: Sequence[Image.Image]) -> torch.Tensor:
    """The processor's RGB conversion + resize + center crop only: (n, 3, H, W), uint8 for the PIL backend.

    For CLIP's usual settings this calls Pillow directly: the same pixels (tests check equality) at a
    fraction of the cost (bench/embed_throughput.py), which matters on a CPU where decoding competes with
    the model for the cores.
    """
    ip = processor.image_processor
    fast = _pillow_resize_crop(ip)
    if fast is None:
        return ip(list(images), do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
    if not images:
        return torch.zeros(0, 3, ip.crop_size.height, ip.crop_size.width, dtype=torch.uint8)
    return torch.from_numpy(np.stack([fast(im) for im in images])).permute(0, 3, 1, 2).contiguous()


def decode_side(processor: CLIPProcessor) -> int | None:
    """The side a JPEG may be decoded down to for this processor (its resize target), None if unknown."""
    size = processor.image_processor.size
    return getattr(size, "shortest_edge", None) or None


def decode_pixels(processor: CLIPProcessor, jpegs: Sequence[bytes]) -> torch.Tensor:
    """Stored JPEG bytes -> (n, 3, H, W) uint8 model input: decoded at the model's size, resized, cropped."""
    from cliprec.codec import decode_jpeg

    side = decode_side(processor)
    return image_pixels(processor, [decode_jpeg(b, side) for b in jpegs])


def _pillow_resize_crop(ip: Any) -> Callable[[Image.Image], np.ndarray] | None:
    # Exactly what CLIPImageProcessorPil does for shortest-edge resize + center crop; None for anything else.
    size, crop = ip.size, ip.crop_size
    plain = (
        type(ip) is CLIPImageProcessorPil
        and ip.do_resize and ip.do_center_crop and ip.do_convert_rgb and not getattr(ip, "do_pad", False)
        and size.shortest_edge and not (size.longest_edge or size.height or size.width)
        and crop.height and crop.width and max(crop.height, crop.width) <= size.shortest_edge
        and isinstance(ip.resample, int)
    )  # fmt: skip
    if not plain:
        return None
    short, ch, cw = size.shortest_edge, crop.height, crop.width

    def resize_crop(im: Image.Image) -> np.ndarray:
        if im.mode != "RGB":
            im = Image.fromarray(convert_to_rgb(im, return_numpy=True))  # alpha onto white, as the processor
        w, h = im.size
        if w <= h:  # transformers' get_resize_output_image_size(default_to_square=False)
            w, h = short, int(short * h / w)
        else:
            w, h = int(short * w / h), short
        x = np.asarray(im.resize((w, h), resample=ip.resample))
        top, left = (h - ch) // 2, (w - cw) // 2
        return x[top : top + ch, left : left + cw]

    return resize_crop


def normalize_pixels(pixels: torch.Tensor, processor: CLIPProcessor) -> torch.Tensor:
    """The processor's rescale + normalise, as float32 on `pixels`' device."""
    ip = processor.image_processor
    x = pixels.float()
    if ip.do_rescale:
        x = x * ip.rescale_factor
    if ip.do_normalize:
        mean = torch.tensor(ip.image_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(ip.image_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x


def text_features(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """L2-normalised projected text embeddings (float32)."""
    out = clip_module(model).get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return F.normalize(out.pooler_output.float(), dim=-1)  # transformers 5: an output object


def image_features(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised projected image embeddings (float32)."""
    out = clip_module(model).get_image_features(pixel_values=pixel_values)
    return F.normalize(out.pooler_output.float(), dim=-1)
