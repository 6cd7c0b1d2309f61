"""The renderer of `tokenizer_mode="openowl"`: vLLM's transformers renderer, with a prompt check that vLLM can't
make for a model whose image token lies past the vocabulary.

vLLM's checks only know the vocabulary's bounds, and the image token is past them on purpose. An `<image>` tag in a
request that sends no image (typed in a message, say) would reach the language model's embedding as an id it has
no row for; here such a prompt is refused with a message that says so.
"""

from __future__ import annotations

from collections.abc import Sequence

from vllm.exceptions import VLLMValidationError
from vllm.renderers.hf import HfRenderer

from openowl.constants import IMAGE_TAG


class OwlRenderer(HfRenderer):
    def _can_produce_offsets(self) -> bool:
        """False: openowl's tokenization (chunk by chunk, `openowl.vllm.tokenizer`) gives ids without character
        offsets, where vLLM's transformers renderer would ask a fast tokenizer (owl-small's) for them."""
        return False

    def validate_token_ids(self, token_ids: Sequence[int], *, parameter: str | None = None) -> None:
        """Refuse image tokens that no image filled: each image's tokens are one whole run of `num_visual_tokens`
        (the multimodal processor grows each tag into one); a lone tag is a run of one.

        Raises:
            VLLMValidationError: an `<image>` tag without its image, or a token id past the vocabulary.
        """
        image = getattr(self.tokenizer, "image_token_id", None)
        if image is not None and image in token_ids:
            per_image = self.tokenizer.owl_processor.num_visual_tokens
            run = 0
            for token in [*token_ids, None]:
                if token == image:
                    run += 1
                    continue
                if run % per_image:
                    raise VLLMValidationError(
                        f"the prompt holds an {IMAGE_TAG} tag with no image for it: send one image per tag "
                        f"(in vLLM, a literal {IMAGE_TAG} in message text is a tag)",
                        parameter=parameter,
                    )
                run = 0
            token_ids = [t for t in token_ids if t != image]
        super().validate_token_ids(token_ids, parameter=parameter)
