"""Image preprocessing shared by training, evaluation and the TorchServe handler.

The one place that says how any image becomes the model's input: decode (with a size check made
before the pixels are decoded), orientation, colour mode, size, normalisation. The handler imports
this module from inside the .mar, so it depends on nothing but torch, torchvision and Pillow.
"""

from __future__ import annotations

import io

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

IMAGE_SIZE = 32  # pixels, square: CIFAR-10's native size
# CIFAR-10 training-set channel statistics; stored in every checkpoint, which is what the handler reads.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# Refuse images whose header declares more pixels than this, before decoding them.
MAX_IMAGE_PIXELS = 40_000_000
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white
# Files read as images from folders (training data, unknown images, export calibration): the formats uploads
# come in, all decoded by decode_image as served images are.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


class ImageDecodeError(ValueError):
    """The bytes are not an image we can classify; the message says why, for the client."""


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode image bytes to an RGB PIL image, or raise ImageDecodeError naming the problem.

    The dimensions are read from the header (Image.open is lazy) and checked before any pixel is
    decoded, so a decompression bomb costs nothing. Only the first frame of an animation is used.
    """
    if not data:
        raise ImageDecodeError("empty request body: send the image bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image: the bytes are not in a format Pillow can read") from None
    except Image.DecompressionBombError as exc:  # Pillow's own header check, past 2x its pixel limit
        raise ImageDecodeError(f"image too large: {exc}") from None
    except Exception as exc:  # malformed headers raise anything from SyntaxError to struct.error
        raise ImageDecodeError(f"unreadable image header: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"invalid image dimensions {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(f"image too large: {width}x{height} pixels (limit {max_pixels:,} pixels)")
    try:
        image.seek(0)
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))
    except Exception as exc:  # truncated or corrupt pixel data
        raise ImageDecodeError(f"corrupt or truncated {image.format} image: {exc}") from None


def read_image_file(path) -> Image.Image:
    """An image file decoded exactly as a served upload (decode_image: EXIF orientation, first frame, RGB)."""
    with open(path, "rb") as file:
        return decode_image(file.read())


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode (1, L, LA, P, RGBA, CMYK, I, I;16, F, ...) to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16/32-bit greyscale: rescale to 0..255 instead of letting convert() clip at 255.
        image = image.convert("F")
        low, high = image.getextrema()
        scale = 255.0 / (high - low) if high > low else 0.0
        return image.point(lambda v: (v - low) * scale).convert("L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def resize_to_model(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """An RGB image of any size to size x size (aspect ratio not kept: CIFAR images are square)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)


def pil_to_uint8(image: Image.Image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor 3 x size x size, the form training keeps its data in."""
    return v2.functional.pil_to_tensor(resize_to_model(to_rgb(image), size))


def normalize(batch_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 N x 3 x H x W (any device) -> normalized float32: the model's input. mean and std are
    per-channel sequences, or float32 tensors already on the batch's device (no copy: a training loop on a
    GPU passes those, since copying a list to the GPU every step would wait for the GPU each time)."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=batch_uint8.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=batch_uint8.device).view(1, 3, 1, 1)
    return (batch_uint8.float() / 255.0 - mean_t) / std_t


def eval_transform(images: list[Image.Image], image_size: int, mean, std) -> torch.Tensor:
    """PIL images -> the normalized float batch: pil_to_uint8, then normalize (the handler takes the same two
    steps image by image, so that a batch never holds full-size photos)."""
    return normalize(torch.stack([pil_to_uint8(im, image_size) for im in images]), mean, std)
