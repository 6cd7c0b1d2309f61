"""mPLUG-Owl as a vLLM model: the multimodal processor that turns each image into its visual tokens' places in the
prompt, and the model that fills them.

- Processing: the tokenizer (`openowl.vllm.tokenizer`) gives each `<image>` one image token; the processor computes
  the image's pixels with openowl's own preprocessing and replaces that token by `num_visual_tokens` of them (65 for
  the released checkpoints: 64 queries and `vit_eos`).
- The model: openowl's ViT, learned queries and abstractor (the same modules and key names as
  `OwlForConditionalGeneration`) encode the images; the language model is vLLM's own implementation of
  `text_config`'s architecture (e.g. `LlamaForCausalLM`), so paged attention, batching and parallelism are vLLM's.
- Weights load from the released `.bin` / safetensors layout unchanged: `language_model.*` goes to vLLM's LM loader,
  the rest key for key into openowl's modules (upstream's stored RoPE buffers are skipped, as openowl skips them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.config.multimodal import BaseDummyOptions
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.sequence import IntermediateTensors

from openowl import checkpoint, loading
from openowl.config import OwlConfig
from openowl.constants import IMAGE_TAG
from openowl.model.abstractor import VisualAbstractor
from openowl.model.owl import build_vision_model
from openowl.processing import OwlProcessor
from openowl.vllm import TOKENIZER_MODE

LM_PREFIX = "language_model."
TIED_HEAD, TIED_EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


class OwlProcessingInfo(BaseProcessingInfo):
    """What vLLM asks of a multimodal model's inputs: images only, any number, each `num_visual_tokens` long."""

    def get_owl_processor(self) -> OwlProcessor:
        """openowl's processor of the checkpoint, which the openowl tokenizer carries.

        Raises:
            ValueError: vLLM runs another tokenizer (its `tokenizer_mode` is not "openowl").
        """
        processor = getattr(self.get_tokenizer(), "owl_processor", None)
        if processor is None:
            raise ValueError(
                f"mPLUG-Owl checkpoints run in vLLM with openowl's tokenizer: pass `--tokenizer-mode {TOKENIZER_MODE}` "
                f"(or `tokenizer_mode={TOKENIZER_MODE!r}` to vllm.LLM); other tokenizers tokenize the prompt otherwise"
            )
        return processor

    @property
    def num_visual_tokens(self) -> int:
        return self.get_owl_processor().num_visual_tokens

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.num_visual_tokens}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {}  # the preprocessing has no per-request options


class OwlDummyInputsBuilder(BaseDummyInputsBuilder[OwlProcessingInfo]):
    """The inputs vLLM profiles memory with: `<image>` tags and images of the model's size."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_TAG * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Mapping[str, BaseDummyOptions]):
        size = self.info.get_owl_processor().image_size
        images = self._get_dummy_images(
            width=size, height=size, num_images=mm_counts.get("image", 0), overrides=mm_options.get("image")
        )
        return {"image": images}


class OwlMultiModalProcessor(BaseMultiModalProcessor[OwlProcessingInfo]):
    """Images -> pixels by openowl's preprocessing; each image token -> `num_visual_tokens` image tokens."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        pixels = self.info.get_owl_processor().preprocess_images(list(hf_data.get("images", [])))
        return BatchFeature({"pixel_values": pixels})

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _apply_prompt_updates(self, token_ids: list[int], mm_prompt_updates):
        """Refuse a prompt whose `<image>` tags and images differ in number, before vLLM looks for the tags.

        Raises:
            ValueError: as many tags as images were not given.
        """
        tags = token_ids.count(self.info.get_tokenizer().image_token_id)
        given = len(mm_prompt_updates.get("image", []))
        if tags != given:
            raise ValueError(f"the prompt holds {tags} {IMAGE_TAG} tag(s) but {given} image(s) were given")
        return super()._apply_prompt_updates(token_ids, mm_prompt_updates)

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image = self.info.get_tokenizer().image_token_id
        return [PromptReplacement(modality="image", target=[image], replacement=[image] * self.info.num_visual_tokens)]


@MULTIMODAL_REGISTRY.register_processor(
    OwlMultiModalProcessor, info=OwlProcessingInfo, dummy_inputs=OwlDummyInputsBuilder
)
class MplugOwlForConditionalGeneration(nn.Module, SupportsMultiModal):
    """openowl's ViT, queries and abstractor in front of vLLM's language model."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_TAG
        raise ValueError(f"mPLUG-Owl in vLLM takes images, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        hf_config = vllm_config.model_config.hf_config
        config = owl_config(hf_config, vllm_config.model_config.model)
        if config.text_config["model_type"] == "bloom":
            raise ValueError("the vLLM plugin serves LLaMA-family LMs; BLOOM checkpoints need `openowl serve`")
        text_config = hf_config.text_config
        # The image token lies past the tokenizer's vocabulary (`openowl.vllm.tokenizer`): masked out of the text
        # embedding lookup.
        self.configure_mm_token_handling(vocab_size=text_config.vocab_size, mm_token_ids=[text_config.vocab_size])
        self._vocab_size = text_config.vocab_size
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_model = build_vision_model(config)
            self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.abstractor.hidden_size))
            self.abstractor = VisualAbstractor(config.abstractor, text_config.hidden_size)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=text_config, prefix=maybe_prefix(prefix, "language_model")
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors
        # Tied in the checkpoint's config (vLLM unties a config whose file also stores `lm_head`, then re-ties it
        # when the two tensors turn out equal).
        model_config = vllm_config.model_config
        self._tied_embeddings = text_config.tie_word_embeddings or model_config.word_embeddings_untied_by_checkpoint

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """Each image's `(num_visual_tokens, hidden)` visual tokens, in the order of the prompt's images."""
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        pixel_values = pixel_values.to(device=self.query_tokens.device, dtype=self.query_tokens.dtype)
        vision_tokens = self.vision_model(pixel_values)  # (N, patches + 1, C)
        queries = self.query_tokens.expand(vision_tokens.shape[0], -1, -1)
        return list(self.abstractor(queries, vision_tokens).unbind(0))  # N × (num_visual_tokens, D)

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """vLLM's splice, after image tokens that no image fills (a text-only prompt made of whole blocks of tags,
        which `OwlRenderer` can't tell from an image's) are mapped into the vocabulary: they must never index past
        the embedding."""
        stray = input_ids >= self._vocab_size
        if is_multimodal is not None:
            stray &= ~is_multimodal.to(input_ids.device)
        input_ids = input_ids.masked_fill(stray, 0)
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The released key layout: `language_model.*` through vLLM's LM loader, the rest into openowl's modules.

        Raises:
            ValueError: a tensor the model has no place for, or of the wrong shape, or one the checkpoint lacks.
        """
        own = dict(self.named_parameters())
        own = {k: v for k, v in own.items() if not k.startswith(LM_PREFIX)}
        loaded: set[str] = set()

        def language_model_weights():
            for name, tensor in weights:
                if name.startswith(LM_PREFIX):
                    name = name.removeprefix(LM_PREFIX)
                    yield name, tensor
                    if self._tied_embeddings and name == TIED_HEAD:
                        # openowl saves a tied tensor once, under the head's name (`checkpoint.save_model`)
                        yield TIED_EMBEDDING, tensor
                elif checkpoint.IGNORED_KEYS.match(name):
                    continue
                elif name not in own:
                    raise ValueError(f"unexpected tensor {name!r} in the checkpoint (not an mPLUG-Owl weight)")
                elif own[name].shape != tensor.shape:
                    raise ValueError(
                        f"tensor {name!r} has shape {list(tensor.shape)}, the model expects {list(own[name].shape)}"
                    )
                else:
                    with torch.no_grad():
                        own[name].copy_(tensor)
                    loaded.add(name)

        loaded |= {LM_PREFIX + name for name in self.language_model.load_weights(language_model_weights())}
        missing = sorted(own.keys() - loaded)
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} tensor(s), e.g. {', '.join(missing[:5])}")
        return loaded


def owl_config(hf_config, model: str) -> OwlConfig:
    """openowl's config of the checkpoint, with what the weights say that released configs get wrong (the abstractor
    MLP width: `checkpoint.reconcile_config`).

    Raises:
        ValueError: a video checkpoint (the plugin serves images only).
    """
    config = hf_config.owl_config()
    folder = loading.resolve_checkpoint(model)
    config = checkpoint.reconcile_config(config, checkpoint.read_index(checkpoint.weight_files(folder)))
    if config.video:
        raise ValueError("the vLLM plugin serves image checkpoints; the video one needs `openowl serve`")
    return config
