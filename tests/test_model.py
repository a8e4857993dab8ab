import json

import numpy as np
import pytest
import torch
from helpers import make_clip
from PIL import Image
from transformers import CLIPModel
from transformers.models.clip import CLIPImageProcessorPil

from cliprec.model import (
    LOGIT_SCALE_FILE,
    add_lora,
    clip_module,
    image_features,
    image_pixels,
    load_clip,
    normalize_pixels,
    save_adapter,
    text_features,
    tokenize,
)

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
TEXTS = ["a red shirt", "blue dress, size 4", "x"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(3)]


def _embed(model, processor, images):
    tok = tokenize(processor, TEXTS, 64)
    with torch.no_grad():
        text = text_features(model, tok["input_ids"], tok["attention_mask"])
        image = image_features(model, normalize_pixels(image_pixels(processor, images), processor))
    return text, image


def _perturb(peft_model, seed=1):
    # LoRA starts as the identity (B = 0); give B some weight, as training would.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_load_clip_gives_eval_model_and_pil_processor(clip_dir):
    model, processor = load_clip(clip_dir, device="cpu")
    assert isinstance(model, CLIPModel) and not model.training
    assert isinstance(processor.image_processor, CLIPImageProcessorPil)


def test_features_match_the_forward_pass_and_the_processor(clip_dir, images):
    model, processor = load_clip(clip_dir, device="cpu")
    batch = processor(text=TEXTS, images=images, return_tensors="pt", padding=True)
    pixels = normalize_pixels(image_pixels(processor, images), processor)
    assert image_pixels(processor, images).dtype == torch.uint8
    assert torch.allclose(pixels, batch["pixel_values"], atol=1e-6)  # split preprocessing == processor
    with torch.no_grad():
        out = model(**batch)
    text, image = _embed(model, processor, images)
    assert torch.allclose(text, out.text_embeds, atol=1e-6)
    assert torch.allclose(image, out.image_embeds, atol=1e-6)
    assert torch.allclose(text.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-6)


def test_fast_image_pixels_equal_the_processor(clip_dir):
    _, processor = load_clip(clip_dir, device="cpu")
    ip = processor.image_processor
    rng = np.random.default_rng(1)
    shapes = [(224, 224), (50, 40), (300, 200), (17, 90), (32, 32), (33, 31), (500, 10)]
    ims = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    rgba = np.asarray(ims[1].convert("RGBA")).copy()
    rgba[..., 3] = rng.integers(0, 256, rgba.shape[:2])  # transparency goes onto white
    ims += [ims[2].convert("L"), Image.fromarray(rgba), ims[3].convert("P")]
    for im in ims:
        want = ip([im], do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
        assert torch.equal(image_pixels(processor, [im]), want), (im.size, im.mode)
    assert image_pixels(processor, []).shape == (0, 3, 32, 32)
    ip.do_center_crop = False  # not CLIP's usual settings: the processor itself runs
    try:
        assert image_pixels(processor, [ims[2]]).shape == (1, 3, 48, 32)
    finally:
        ip.do_center_crop = True


def test_add_lora_trains_only_lora_and_starts_as_identity(clip_dir, images):
    model, processor = load_clip(clip_dir, device="cpu")
    before = _embed(model, processor, images)
    peft_model = add_lora(model, LORA)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    towers = {("vision" if "vision_model" in n else "text") for n in trainable}
    assert towers == {"vision", "text"}  # both towers adapted
    after = _embed(peft_model, processor, images)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_adapter_save_load_merge_reproduces_embeddings(clip_dir, images, tmp_path):
    model, processor = load_clip(clip_dir, device="cpu")
    peft_model = add_lora(model, LORA)
    _perturb(peft_model)
    peft_model.eval()
    trained = _embed(peft_model, processor, images)
    zeroshot = _embed(load_clip(clip_dir, device="cpu")[0], processor, images)
    assert (trained[1] - zeroshot[1]).abs().max() > 1e-2  # the adapter does change the vectors
    save_adapter(peft_model, tmp_path / "adapter")
    assert not (tmp_path / "adapter" / LOGIT_SCALE_FILE).exists()  # frozen temperature: nothing to save
    for merge in (True, False):
        loaded, _ = load_clip(clip_dir, adapter=tmp_path / "adapter", device="cpu", merge=merge)
        assert isinstance(loaded, CLIPModel) == merge
        # tolerance: merging W + BA reorders float32 sums (observed ~1e-7)
        for a, b in zip(trained, _embed(loaded, processor, images), strict=True):
            assert torch.allclose(a, b, atol=1e-5), (merge, (a - b).abs().max())


def test_saved_adapter_config_does_not_depend_on_the_hash_seed(clip_dir, tmp_path):
    # PEFT keeps target_modules in a set: its file order changed from process to process, and with it the
    # DVC hash of data/train/<cat> (so embed_lora reran after every forced train, on the same adapter)
    modules = ["v_proj", "q_proj", "out_proj", "k_proj"]
    model, _ = load_clip(clip_dir, device="cpu")
    save_adapter(add_lora(model, {**LORA, "target_modules": modules}), tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(modules)
    assert list(config) == sorted(config)


def test_trained_logit_scale_is_saved_and_loaded(clip_dir, tmp_path):
    model, _ = load_clip(clip_dir, device="cpu")
    peft_model = add_lora(model, LORA, train_logit_scale=True)
    scale = clip_module(peft_model).logit_scale
    assert scale.requires_grad
    with torch.no_grad():
        scale.fill_(3.25)
    save_adapter(peft_model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / LOGIT_SCALE_FILE).read_text()) == {"logit_scale": 3.25}
    loaded, _ = load_clip(clip_dir, adapter=tmp_path / "adapter", device="cpu")
    assert float(loaded.logit_scale) == 3.25


def test_load_clip_refuses_a_missing_adapter_or_model_dir(clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a trained LoRA adapter"):
        load_clip(clip_dir, adapter=tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="has no 'demo-clip'"):  # not a hub lookup
        load_clip(tmp_path / "demo-clip")


def test_normalize_pixels_follows_the_processor_flags(clip_dir):
    _, processor = load_clip(clip_dir, device="cpu")
    u8 = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    want = (
        torch.tensor([(1 - m) / s for m, s in zip(mean, std, strict=True)])
        .view(1, 3, 1, 1)
        .expand(1, 3, 2, 2)
    )
    assert torch.allclose(normalize_pixels(u8, processor), want.expand(1, 3, 2, 2), atol=1e-6)
