"""cliprec: product recommendation with CLIP, LoRA and DVC."""
