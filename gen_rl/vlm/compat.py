"""Loading vision-language processors when ``torchvision`` is not installed.

transformers 5 builds every video processor on torchvision, and ``ProcessorMixin`` checks its video-processor
argument against ``VideoProcessorMixin``, a name transformers only exports when torchvision is present. Without
torchvision a Qwen2-VL / Qwen2.5-VL processor can therefore be neither built nor loaded, although image-only
training never touches the video path. This module works around that, and only when torchvision is absent:
it exposes ``VideoProcessorMixin`` where the argument check looks for it and loads the processor from its parts
(``AutoImageProcessor`` falls back to the PIL backend by itself) with a bare placeholder video processor that is
never called. With torchvision installed :func:`load_processor` is plain ``AutoProcessor.from_pretrained``.
"""

from __future__ import annotations

import transformers
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, processing_utils
from transformers.utils import is_torchvision_available
from transformers.video_processing_utils import VideoProcessorMixin

__all__ = ["allow_processors_without_torchvision", "load_processor", "placeholder_video_processor"]


def allow_processors_without_torchvision() -> None:
    """Let ``ProcessorMixin`` accept a video processor when torchvision is absent (no-op otherwise)."""
    if is_torchvision_available():
        return
    library = processing_utils.transformers_module
    if not hasattr(library, "VideoProcessorMixin"):
        library.VideoProcessorMixin = VideoProcessorMixin


def placeholder_video_processor() -> VideoProcessorMixin:
    """A video processor that satisfies the processor's constructor; image-only training never calls it."""
    allow_processors_without_torchvision()
    return VideoProcessorMixin()


def load_processor(
    name_or_path: str, image_processor_kwargs: dict | None = None
) -> processing_utils.ProcessorMixin:
    """``AutoProcessor.from_pretrained``; without torchvision, the same processor class assembled from parts.

    ``image_processor_kwargs`` (e.g. Qwen's ``min_pixels`` / ``max_pixels``) go to the image processor. The
    fallback reads ``processor_class`` and the chat template from the processor config, loads the image
    processor and tokenizer through their Auto classes and passes a placeholder video processor.
    """
    image_processor_kwargs = dict(image_processor_kwargs or {})
    if is_torchvision_available():
        return AutoProcessor.from_pretrained(name_or_path, **image_processor_kwargs)
    try:
        return AutoProcessor.from_pretrained(name_or_path, **image_processor_kwargs)
    except (ImportError, AttributeError, ValueError):
        pass  # the video processor needs torchvision (the error type varies): assemble the processor below
    allow_processors_without_torchvision()
    processor_dict, _ = processing_utils.ProcessorMixin.get_processor_dict(name_or_path)
    class_name = processor_dict.get("processor_class")
    processor_class = getattr(transformers, class_name, None) if class_name else None
    if processor_class is None:
        raise ImportError(
            f"cannot load the processor of {name_or_path!r} without torchvision (processor_class={class_name!r}); "
            "install torchvision (pip install torchvision) to use AutoProcessor directly."
        )
    parts = {}
    for attribute in processor_class.get_attributes():
        if attribute == "tokenizer":
            parts[attribute] = AutoTokenizer.from_pretrained(name_or_path)
        elif attribute == "image_processor":
            parts[attribute] = AutoImageProcessor.from_pretrained(name_or_path, **image_processor_kwargs)
        elif attribute == "video_processor":
            parts[attribute] = placeholder_video_processor()
        else:
            raise ImportError(
                f"{class_name} needs a {attribute!r} that cannot be loaded without torchvision; "
                "install torchvision (pip install torchvision)."
            )
    return processor_class(**parts, chat_template=processor_dict.get("chat_template"))
