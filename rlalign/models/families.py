"""Loading a checkpoint's processor where `AutoProcessor` cannot, family by family.

transformers (checked with 5.24) builds the video processor of Qwen2-VL and Qwen2.5-VL only with
torchvision, and their processors refuse to construct without one, so `AutoProcessor` fails on a
machine without torchvision (rlalign does not depend on it: its registry wheels pull CUDA builds).
For those families, on such a machine, we load the same processor class minus its video half: text
and images are processed exactly as by the stock class (the image processor is the Pillow backend
that `AutoImageProcessor` picks), videos are not supported. Everything else goes to `AutoProcessor`.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, AutoProcessor, ProcessorMixin, Qwen2_5_VLProcessor, Qwen2VLProcessor
from transformers.utils import is_torchvision_available


def image_only(processor_cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`processor_cls` without its `video_processor` attribute.

    The subclass keeps the parent's name, so the `processor_class` it saves is the stock one and a
    machine with torchvision loads the export with plain `AutoProcessor`.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # A processor_config.json saved by the stock class carries the video processor's settings.
        kwargs.pop("video_processor", None)
        processor_cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    namespace = {
        "__init__": __init__,
        "__module__": __name__,
        "__doc__": f"{processor_cls.__name__}, images only.",
    }
    return type(processor_cls.__name__, (processor_cls,), namespace)


# model_type -> processor without video half, used only when torchvision is missing.
IMAGE_ONLY_PROCESSORS: dict[str, type[ProcessorMixin]] = {
    "qwen2_vl": image_only(Qwen2VLProcessor),
    "qwen2_5_vl": image_only(Qwen2_5_VLProcessor),
}


def load_processor(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    """The checkpoint's processor: `AutoProcessor`, or the image-only one of its family (see above)."""
    if not is_torchvision_available():
        model_type = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code).model_type
        if model_type in IMAGE_ONLY_PROCESSORS:
            return IMAGE_ONLY_PROCESSORS[model_type].from_pretrained(name_or_path)
    return AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
