"""The reward service wire format: pixels, prompts and metadata over HTTP as safetensors or PNG, never pickle.

Request: ``POST /score`` with one of two bodies.

* ``Content-Type: application/x-safetensors``: a safetensors file holding one tensor ``"pixels"`` (images
  ``[B, C, H, W]`` or videos ``[B, C, T, H, W]``; uint8 in [0, 255], or float16 / float32 in [0, 1]) and the
  string metadata ``{"prompts": <JSON list of B strings>, "metadata": <JSON list of B dicts>}``.
* ``Content-Type: application/json``: ``{"images_png": [base64 PNG per sample], "prompts": [...],
  "metadata": [...]}`` (images only; every PNG of one request has the same size and mode: L, RGB or RGBA).

``encode_request`` writes them with ``fmt``:

* ``"safetensors"`` (the default): float16 pixels. Exact enough for rewards: float16 keeps 11 significant
  bits, so a value in [0, 1] moves by at most 2**-12 (about 2.4e-4); the tests bound the score change by 1e-3.
* ``"safetensors_uint8"``: pixels rounded to uint8 (half the bytes; each value moves by at most 0.5 / 255).
  Rewards that round to uint8 themselves (JPEG, PNG-based scorers) see exactly the same image.
* ``"safetensors_float32"``: exact, twice the bytes of float16.
* ``"png"``: lossless PNG of the uint8-rounded image, per sample (images only; smallest for flat images).

Response (JSON): ``{"scores": [B floats], "components": {name: [B floats]}, "elapsed_s": seconds}`` where a
NaN ("no score") is ``null`` and an infinity is the string ``"inf"`` / ``"-inf"``. Errors are
``{"error": "..."}`` with an HTTP status: 400 bad payload (malformed, empty, JSON nested deeper than
``MAX_JSON_DEPTH``), 401 token, 411 no Content-Length, 413 over a limit, 415 a content type other than the two
above (pickle is never accepted), 500 the reward failed.

Size limits (``RequestLimits``) are checked from headers before anything is decoded: the body size from
Content-Length, the samples and pixels from the safetensors header or each PNG's IHDR chunk, so that a small
body claiming huge images (a "decompression bomb") is refused with 413 without allocating them.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from rewards.base import PIXEL_TOLERANCE, RewardOutput, per_sample_text

MIB = 1024 * 1024
SAFETENSORS_TYPE = "application/x-safetensors"
JSON_TYPE = "application/json"
CONTENT_TYPES = (SAFETENSORS_TYPE, JSON_TYPE)
PIXELS_KEY = "pixels"
WIRE_FORMATS = ("safetensors", "safetensors_uint8", "safetensors_float32", "png")
_FORMAT_DTYPES = {
    "safetensors": torch.float16,
    "safetensors_uint8": torch.uint8,
    "safetensors_float32": torch.float32,
}
_SAFETENSORS_DTYPES = {"U8": 1, "F16": 2, "F32": 4}  # accepted dtypes and their sizes in bytes
_PNG_MODES = {"L": 1, "RGB": 3, "RGBA": 4}
_PNG_MODE_OF_CHANNELS = {channels: mode for mode, channels in _PNG_MODES.items()}
_PICKLE_PROTOCOLS = range(2, 6)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # IHDR colour type -> channels PIL decodes it to
MAX_JSON_DEPTH = 32  # nesting levels a JSON body or metadata may have (deeper: 400)


class RequestRejected(Exception):  # noqa: N818 - the name the service API uses
    """A request the server refuses: ``status`` is the HTTP status, ``message`` names the problem and fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RequestLimits:
    """What one request may hold; checked from headers before the payload is decoded.

    Pixels count decoded values, C * [T *] H * W per sample. ``max_pixels_per_sample`` (default: one
    4096 x 4096 RGB image, or 16 RGB frames of 1024 x 1024) bounds one sample; ``max_pixels_per_request``
    bounds their sum over the request (default 2**26 values: 256 MiB as float32, e.g. 21 RGB images of
    1024 x 1024 or 85 of 512 x 512), so a request's decoded memory is bounded whatever its body size.
    """

    max_request_bytes: int = 64 * MIB
    max_batch: int = 256
    max_pixels_per_sample: int = 3 * 4096 * 4096
    max_pixels_per_request: int = 2**26

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_batch", "max_pixels_per_sample", "max_pixels_per_request"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RequestLimits.{name} must be a positive integer; got {value!r}")

    def check_body_size(self, size: int) -> None:
        """413 when a body of ``size`` bytes is over ``max_request_bytes``."""
        if size > self.max_request_bytes:
            raise RequestRejected(
                413,
                f"request body is {size / MIB:.2f} MiB, over the server's limit of "
                f"{self.max_request_bytes / MIB:.2f} MiB; send fewer samples per request (lower "
                "max_batch_per_request) or start the server with a larger --max-request-mb",
            )

    def check_batch(self, batch: int) -> None:
        """413 when a request holds more than ``max_batch`` samples."""
        if batch > self.max_batch:
            raise RequestRejected(
                413,
                f"request holds {batch} samples, over the server's max_batch of {self.max_batch}; split it "
                "(lower max_batch_per_request) or start the server with a larger --max-batch",
            )

    def check_sample_size(self, values: int, shape: Sequence[int]) -> None:
        """413 when one sample holds more than ``max_pixels_per_sample`` values."""
        if values > self.max_pixels_per_sample:
            raise RequestRejected(
                413,
                f"one sample of shape {tuple(shape)} holds {values} values, over the server's limit of "
                f"{self.max_pixels_per_sample} per sample; downscale the samples before scoring",
            )

    def check_request_pixels(self, values: int, batch: int) -> None:
        """413 when a request's ``batch`` samples decode to more than ``max_pixels_per_request`` values."""
        if values > self.max_pixels_per_request:
            raise RequestRejected(
                413,
                f"request of {batch} samples decodes to {values} pixel values, over the server's budget of "
                f"{self.max_pixels_per_request} per request; send fewer or smaller samples per request "
                "(RemoteReward sizes its requests from /health) or start the server with a larger "
                "--max-request-pixels",
            )


# ----- requests ----------------------------------------------------------------------------------------------
def encode_request(
    pixels: Tensor,
    prompts: Sequence[str],
    metadata: Sequence[dict] | None = None,
    fmt: str = "safetensors",
) -> tuple[bytes, str]:
    """``(body, content_type)`` of a ``POST /score`` request for ``pixels`` in [0, 1] (see the module doc)."""
    if fmt not in WIRE_FORMATS:
        raise ValueError(f"unknown wire format {fmt!r}; use one of {', '.join(WIRE_FORMATS)}")
    if not isinstance(pixels, Tensor) or pixels.ndim not in (4, 5):
        shape = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
        raise ValueError(f"pixels must be a tensor [B, C, H, W] or [B, C, T, H, W]; got {shape}")
    batch = pixels.shape[0]
    prompts, records = _checked_text(prompts, metadata, batch)
    if fmt == "png":
        return _encode_png_request(pixels, prompts, records), JSON_TYPE
    tensor = _to_wire_dtype(pixels, _FORMAT_DTYPES[fmt])
    header = {"prompts": _json_dumps(prompts, "prompts"), "metadata": _json_dumps(records, "metadata")}
    return save_safetensors({PIXELS_KEY: tensor}, metadata=header), SAFETENSORS_TYPE


def _checked_text(
    prompts: Sequence[str], metadata: Sequence[dict] | None, batch: int
) -> tuple[list[str], list[dict]]:
    """Prompts and metadata records as lists of length ``batch`` (None / empty metadata: empty records)."""
    prompts, records = per_sample_text(prompts, metadata, batch, "encode_request")
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError("prompts must be strings")
    return prompts, records


def _json_dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{what} must be JSON-serialisable (str, numbers, lists, dicts; no NaN) to go over the wire: {error}"
        ) from error


def _to_wire_dtype(pixels: Tensor, dtype: torch.dtype) -> Tensor:
    """``pixels`` on the CPU, contiguous, in ``dtype`` (uint8: rounded from [0, 1] to [0, 255])."""
    pixels = pixels.detach().to("cpu")
    if dtype == torch.uint8:
        if not pixels.is_floating_point():
            return pixels.to(torch.uint8).contiguous()
        return (pixels.float().nan_to_num(0.0).clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    if not pixels.is_floating_point():
        pixels = pixels.float() / 255
    return pixels.to(dtype).contiguous()


def _encode_png_request(pixels: Tensor, prompts: list[str], records: list[dict]) -> bytes:
    if pixels.ndim != 4 or pixels.shape[1] not in _PNG_MODE_OF_CHANNELS:
        raise ValueError(
            f"the png wire format carries images [B, C, H, W] with C in 1, 3 or 4; got shape "
            f"{tuple(pixels.shape)}; use fmt='safetensors' for videos and other channel counts"
        )
    images = _to_wire_dtype(pixels, torch.uint8).permute(0, 2, 3, 1).numpy()
    mode = _PNG_MODE_OF_CHANNELS[pixels.shape[1]]
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if mode == "L" else image, mode=mode).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    body = {"images_png": encoded, "prompts": prompts, "metadata": records}
    return json.dumps(body, allow_nan=False).encode("utf-8")


def media_type(content_type: str | None) -> str:
    """The lower-cased media type of a Content-Type header, without parameters (``""`` when absent)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_request(
    body: bytes, content_type: str | None, limits: RequestLimits | None = None
) -> tuple[Tensor, list[str], list[dict]]:
    """``(pixels float32 in [0, 1], prompts, metadata)`` of a request body, or ``RequestRejected``."""
    limits = limits or RequestLimits()
    kind = media_type(content_type)
    if kind not in CONTENT_TYPES:
        raise RequestRejected(
            415,
            f"unsupported Content-Type {kind or '(none)'!r}; send {SAFETENSORS_TYPE} (a safetensors file) or "
            f"{JSON_TYPE} (base64 PNGs), e.g. with rewards.wire.encode_request; pickle is never accepted",
        )
    limits.check_body_size(len(body))
    if kind == SAFETENSORS_TYPE:
        pixels, header = _decode_safetensors(body, limits)
        prompts, records = _parse_text(_header_json(header, "prompts"), _header_json(header, "metadata"))
    else:
        payload = _parse_json_body(body)
        pixels = _decode_pngs(payload.get("images_png"), limits)
        prompts, records = _parse_text(payload.get("prompts"), payload.get("metadata", []))
    _check_text_lengths(pixels.shape[0], prompts, records)
    return pixels, prompts, records


def _decode_safetensors(body: bytes, limits: RequestLimits) -> tuple[Tensor, dict[str, str]]:
    """The checked header first (shape, dtype, limits), then the pixels as float32 in [0, 1]."""
    header = _safetensors_header(body)
    _check_pixels_entry(header, limits)
    text = header.get("__metadata__") or {}
    if not isinstance(text, dict) or not all(isinstance(value, str) for value in text.values()):
        raise RequestRejected(400, "safetensors __metadata__ must map names to strings; use encode_request")
    try:
        tensors = load_safetensors(body)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise RequestRejected(400, f"the body is not a valid safetensors file: {error}") from error
    pixels = tensors.pop(PIXELS_KEY)
    if pixels.dtype == torch.uint8:
        return pixels.float().div_(255), text
    pixels = pixels.float()
    _check_float_range(pixels)
    return pixels, text


def _safetensors_header(body: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON), or 400 / 415."""
    if len(body) >= 8:
        (length,) = struct.unpack("<Q", body[:8])
        if 8 + length <= len(body):
            try:
                header = json.loads(body[8 : 8 + length])
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                header = None
            if isinstance(header, dict):
                return header
    if _looks_like_pickle(body):
        raise RequestRejected(
            415, "the body looks like a pickle, which is never accepted; send a safetensors file"
        )
    raise RequestRejected(
        400, "the body is not a safetensors file (bad header); build it with rewards.wire.encode_request"
    )


def _looks_like_pickle(body: bytes) -> bool:
    return len(body) >= 2 and body[0] == 0x80 and body[1] in _PICKLE_PROTOCOLS


def _check_pixels_entry(header: dict[str, Any], limits: RequestLimits) -> None:
    """400 / 413 from the header alone: one ``pixels`` tensor of an accepted dtype, rank, batch and size."""
    names = [name for name in header if name != "__metadata__"]
    if names != [PIXELS_KEY]:
        raise RequestRejected(
            400, f"the safetensors file must hold exactly one tensor {PIXELS_KEY!r}; got {names}"
        )
    entry = header[PIXELS_KEY]
    if not isinstance(entry, dict):
        raise RequestRejected(
            400, f"the safetensors entry {PIXELS_KEY!r} is not an object; use encode_request"
        )
    dtype, shape = entry.get("dtype"), entry.get("shape")
    if dtype not in _SAFETENSORS_DTYPES:
        raise RequestRejected(
            400, f"pixels dtype {dtype!r} is not accepted; send uint8 (0..255), float16 or float32 (0..1)"
        )
    if not isinstance(shape, list) or len(shape) not in (4, 5) or not all(isinstance(n, int) for n in shape):
        raise RequestRejected(400, f"pixels must be [B, C, H, W] or [B, C, T, H, W]; got shape {shape}")
    if min(shape) < 1:
        raise RequestRejected(
            400, f"pixels of shape {shape} hold no samples; send at least one sample with every size >= 1"
        )
    limits.check_batch(shape[0])
    limits.check_sample_size(math.prod(shape[1:]), shape[1:])
    limits.check_request_pixels(math.prod(shape), shape[0])


def _check_float_range(pixels: Tensor) -> None:
    finite = pixels[torch.isfinite(pixels)]
    if finite.numel() and (finite.min() < -PIXEL_TOLERANCE or finite.max() > 1 + PIXEL_TOLERANCE):
        raise RequestRejected(
            400,
            f"float pixels must be in [0, 1]; got values in [{finite.min().item():.4g}, "
            f"{finite.max().item():.4g}] (divide uint8 by 255; map [-1, 1] decoder output with (x + 1) / 2)",
        )


def _header_json(header: dict[str, str], key: str) -> Any:
    text = header.get(key)
    if text is None:
        return [] if key == "metadata" else None
    return _loads_json(text, f"safetensors metadata {key!r}")


def _loads_json(text: str | bytes, what: str) -> Any:
    """The parsed JSON ``text``, or 400 when it does not parse or nests deeper than ``MAX_JSON_DEPTH``."""
    try:
        value = json.loads(text)
        too_deep = _nests_deeper_than(value, MAX_JSON_DEPTH)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestRejected(400, f"{what} does not parse as JSON: {error}") from error
    except RecursionError:  # the parser's own limit (about 1000 levels)
        too_deep = True
    if too_deep:
        raise RequestRejected(
            400, f"{what} nests JSON deeper than {MAX_JSON_DEPTH} levels; send flat prompts and metadata"
        )
    return value


def _nests_deeper_than(value: Any, limit: int) -> bool:
    """Whether lists / objects in ``value`` nest more than ``limit`` levels (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _parse_json_body(body: bytes) -> dict[str, Any]:
    payload = _loads_json(body, "the body")
    if not isinstance(payload, dict):
        raise RequestRejected(400, 'the JSON body must be an object {"images_png": [...], "prompts": [...]}')
    return payload


def _decode_pngs(images: Any, limits: RequestLimits) -> Tensor:
    """``[B, C, H, W]`` float32 in [0, 1] from base64 PNGs of one size and mode.

    Every PNG's size is read from its IHDR header and checked against ``limits`` (per sample and summed over
    the request) before any PNG is decoded.
    """
    if not isinstance(images, list) or not images:
        raise RequestRejected(400, '"images_png" must be a non-empty list of base64-encoded PNG images')
    limits.check_batch(len(images))
    blobs = [_base64_bytes(text, index) for index, text in enumerate(images)]
    values = 0
    for index, blob in enumerate(blobs):
        width, height, channels = png_header_size(blob, index)
        limits.check_sample_size(channels * height * width, (channels, height, width))
        values += channels * height * width
    limits.check_request_pixels(values, len(blobs))
    arrays, first = [], None
    for index, blob in enumerate(blobs):
        image = _open_png(blob, index)
        if image.mode not in _PNG_MODES:
            raise RequestRejected(400, f"PNG {index} has mode {image.mode}; send L, RGB or RGBA images")
        form = (image.mode, image.size)
        first = first or form
        if form != first:
            raise RequestRejected(
                400, f"PNG {index} is {form}, PNG 0 is {first}; send samples of one size and mode per request"
            )
        arrays.append(_png_array(image, index))
    stacked = torch.from_numpy(np.stack(arrays))  # [B, H, W, C] uint8
    del arrays
    return stacked.permute(0, 3, 1, 2).contiguous().float().div_(255)


def png_header_size(data: bytes, index: int = 0) -> tuple[int, int, int]:
    """``(width, height, channels)`` of a PNG from its IHDR chunk alone (no decoding); 400 if it is no PNG."""
    if len(data) < 26 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise RequestRejected(
            400, f"images_png[{index}] is not a PNG (no PNG signature and IHDR header); send lossless PNGs"
        )
    width, height, _bit_depth, colour_type = struct.unpack(">IIBB", data[16:26])
    if colour_type not in _PNG_CHANNELS or width < 1 or height < 1:
        raise RequestRejected(
            400, f"images_png[{index}] has a bad IHDR header ({width} x {height}, colour type {colour_type})"
        )
    return width, height, _PNG_CHANNELS[colour_type]


def _base64_bytes(text: Any, index: int) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (TypeError, ValueError, binascii.Error) as error:
        raise RequestRejected(400, f"images_png[{index}] is not a base64-encoded PNG: {error}") from error


def _open_png(data: bytes, index: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except (ValueError, OSError, Image.DecompressionBombError) as error:
        raise RequestRejected(400, f"images_png[{index}] is not a valid PNG: {error}") from error
    if image.format != "PNG":
        raise RequestRejected(400, f"images_png[{index}] is a {image.format}, not a PNG; send lossless PNGs")
    return image


def _png_array(image: Image.Image, index: int) -> np.ndarray:
    try:
        array = np.asarray(image)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise RequestRejected(400, f"images_png[{index}] does not decode: {error}") from error
    return array[..., None] if array.ndim == 2 else array


def _parse_text(prompts: Any, metadata: Any) -> tuple[list[str], list[dict]]:
    if not isinstance(prompts, list) or not all(isinstance(prompt, str) for prompt in prompts):
        raise RequestRejected(400, '"prompts" must be a JSON list of strings, one per sample')
    if metadata is None:
        metadata = []
    if not isinstance(metadata, list) or not all(isinstance(record, dict) for record in metadata):
        raise RequestRejected(400, '"metadata" must be a JSON list of objects, one per sample (or empty)')
    return prompts, metadata


def _check_text_lengths(batch: int, prompts: list[str], records: list[dict]) -> None:
    if not records:
        records.extend({} for _ in range(batch))
    if len(prompts) != batch or len(records) != batch:
        raise RequestRejected(
            400,
            f"request holds {batch} samples, {len(prompts)} prompts and {len(records)} metadata records; "
            "send one prompt and one metadata record (or none at all) per sample",
        )


# ----- responses ---------------------------------------------------------------------------------------------
def _to_json_number(value: float) -> float | str | None:
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _from_json_number(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, str) and value in ("inf", "-inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"a score must be a number, null or 'inf' / '-inf'; got {value!r}")
    return float(value)


def _vector_to_json(values: Tensor) -> list[float | str | None]:
    return [_to_json_number(value) for value in values.detach().to("cpu", torch.float32).tolist()]


def _vector_from_json(values: Any, batch: int | None, what: str) -> Tensor:
    if not isinstance(values, list) or (batch is not None and len(values) != batch):
        count = len(values) if isinstance(values, list) else type(values).__name__
        raise ValueError(f"the response's {what} must be a list of {batch} numbers; got {count}")
    return torch.tensor([_from_json_number(value) for value in values], dtype=torch.float32)


def encode_response(output: RewardOutput, elapsed_s: float) -> bytes:
    """The JSON response body for ``output`` (NaN as null, infinities as "inf" / "-inf")."""
    body = {
        "scores": _vector_to_json(output.scores),
        "components": {name: _vector_to_json(values) for name, values in output.components.items()},
        "elapsed_s": round(float(elapsed_s), 6),
    }
    return json.dumps(body, allow_nan=False).encode("utf-8")


def decode_response(body: bytes, batch: int | None = None) -> RewardOutput:
    """The ``RewardOutput`` of a response body (null back to NaN); ``ValueError`` if it is malformed.

    With ``batch`` given, every vector must hold exactly ``batch`` values.
    """
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"the response is not JSON: {error}") from error
    if not isinstance(payload, dict) or "scores" not in payload:
        raise ValueError('the response must be a JSON object with "scores"')
    scores = _vector_from_json(payload["scores"], batch, "scores")
    components = payload.get("components") or {}
    if not isinstance(components, dict):
        raise ValueError('the response\'s "components" must be an object {name: [numbers]}')
    return RewardOutput(
        scores=scores,
        components={
            str(name): _vector_from_json(values, len(scores), f"component {name!r}")
            for name, values in components.items()
        },
    )


def encode_error(message: str) -> bytes:
    """The JSON body ``{"error": message}`` of an error response."""
    return json.dumps({"error": message}).encode("utf-8")


def error_message(body: bytes) -> str:
    """The ``"error"`` of an error response body, or the start of the body when it is not one."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        return payload["error"]
    return body[:300].decode("utf-8", "replace").strip() or "(empty body)"
