"""CLIP's symmetric contrastive (InfoNCE) loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    all_image: torch.Tensor | None = None,
    all_text: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies; pair i is each other's positive.

    `logit_scale` is CLIP's log-temperature (the logits are multiplied by its exp). Under DDP pass the
    features gathered from every rank as `all_image`/`all_text` and this rank's position in them as
    `offset`: the local rows are then scored against the global batch (open_clip's `local_loss`).
    """
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    all_image = image if all_image is None else F.normalize(all_image, dim=-1)
    all_text = text if all_text is None else F.normalize(all_text, dim=-1)
    scale = logit_scale.exp()
    labels = torch.arange(len(image), device=image.device) + offset
    loss_i2t = F.cross_entropy(scale * image @ all_text.T, labels)
    loss_t2i = F.cross_entropy(scale * text @ all_image.T, labels)
    return (loss_i2t + loss_t2i) / 2
