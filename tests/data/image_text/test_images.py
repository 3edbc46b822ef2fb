"""CLIP preprocessing against transformers' CLIPImageProcessor; decode failures; augmentation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from jaxfit.data.image_text import images


def _reference_processor():
    """transformers' CLIP image processor on its PIL path (the only one in transformers 4.x;
    CLIPImageProcessorPil in 5.x, which CLIPImageProcessor falls back to without
    torchvision). The torchvision backend resamples differently (antialiased tensor
    bicubic), so it is not the reference for PIL preprocessing."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil()
    except ImportError:
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor()


def test_constants_are_transformers_openai_clip_mean_std():
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    assert images.OPENAI_CLIP_MEAN == tuple(OPENAI_CLIP_MEAN)
    assert images.OPENAI_CLIP_STD == tuple(OPENAI_CLIP_STD)


@pytest.mark.parametrize("image_size", [224, 64])
@pytest.mark.shared_data
def test_eval_preprocessing_matches_clip_image_processor(image_size, shared):
    coco = sorted(shared("coco_mini", "train2017").glob("*.jpg"))[:6]
    flickr = sorted(shared("flickr8k_1k_small", "images").glob("*.jpg"))[:4]
    proc = _reference_processor()
    kw = {
        "size": {"shortest_edge": image_size},
        "crop_size": {"height": image_size, "width": image_size},
    }
    for path in coco + flickr:  # landscape, portrait, square, smaller than 224 (upsampling)
        with Image.open(path) as im:
            ref = proc(im, return_tensors="np", **kw)["pixel_values"][0].transpose(1, 2, 0)
        ours = images.load_image(path, image_size)
        assert ours.shape == (image_size, image_size, 3) and ours.dtype == np.float32
        # Same PIL bicubic on the same uint8 image, same crop: only float rounding differs.
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_transparency_is_composited_on_white_like_transformers():
    from transformers.image_transforms import convert_to_rgb

    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :15, 3] = 0  # left half transparent
    rgba[:, 15:, 3] = 128
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    ours = np.asarray(images.decode_image(buf.getvalue()))
    ref = convert_to_rgb(Image.open(io.BytesIO(buf.getvalue())), return_numpy=True)
    np.testing.assert_array_equal(ours, ref)
    assert (ours[:, :15] == 255).all()


def test_decode_errors_raise_image_decode_error(tmp_path):
    jpg = tmp_path / "ok.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (60, 80, 3), np.uint8)
    Image.fromarray(noise).save(jpg, quality=90)
    data = jpg.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all" * 10)
    for bad in (truncated, garbage, tmp_path / "missing.jpg", data[:100]):
        with pytest.raises(images.ImageDecodeError):
            images.decode_image(bad)
    assert images.decode_image(data).size == Image.open(jpg).size  # bytes input works


def test_augment_is_deterministic_in_rng_and_changes_the_crop():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), np.uint8))
    aug = images.Augment(scale=(0.3, 1.0))
    a = images.preprocess_image(img, 32, augment=aug, rng=np.random.default_rng(1))
    b = images.preprocess_image(img, 32, augment=aug, rng=np.random.default_rng(1))
    c = images.preprocess_image(img, 32, augment=aug, rng=np.random.default_rng(2))
    assert a.shape == (32, 32, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="rng"):
        images.preprocess_image(img, 32, augment=aug)


def test_full_scale_crop_without_flip_is_a_plain_resize_and_flip_mirrors():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8))
    whole = images.Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    out = images.preprocess_image(img, 24, augment=whole, rng=np.random.default_rng(0))
    ref = images.normalize(np.asarray(img.resize((24, 24), Image.Resampling.BICUBIC)))
    np.testing.assert_allclose(out, ref, atol=1e-6)
    flip = images.Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=True)
    outs = [
        images.preprocess_image(img, 24, augment=flip, rng=np.random.default_rng(s))
        for s in range(8)
    ]
    assert any(np.allclose(o, ref[:, ::-1]) for o in outs)
    assert any(np.allclose(o, ref) for o in outs)
    assert images.Augment().hflip is False  # flips are opt-in
