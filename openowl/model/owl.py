"""mPLUG-Owl: vision encoder + visual abstractor + a transformers causal LM, composed, and the splice that puts
each image's visual tokens where its placeholder ids stand in the prompt.

Prompts carry `num_visual_tokens` (65) placeholder ids per image (`IMAGE_PLACEHOLDER_ID`, -1) or per video
(`VIDEO_PLACEHOLDER_ID`, -2); `embed_inputs` swaps them for the visual tokens with one `masked_scatter`.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from openowl.config import DINOV2_MODEL_TYPE, OwlConfig
from openowl.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID, IMAGE_TAG, VIDEO_PLACEHOLDER_ID, VIDEO_TAG
from openowl.model.abstractor import VisualAbstractor
from openowl.model.vision import Dinov2VisionModel, VisionModel


class PreAppliedLayerNorm(nn.LayerNorm):
    """BLOOM's embedding LayerNorm, applied by the owl to text embeddings *before* the splice.

    Upstream keeps visual tokens out of `word_embeddings_layernorm` by applying it to the text embeddings itself
    and skipping it inside BLOOM. This module keeps the weights under BLOOM's own key names, but its `forward` is
    the identity; `normalize` is the real LayerNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def build_language_model(config: OwlConfig) -> nn.Module:
    lm = AutoModelForCausalLM.from_config(config.build_text_config())
    if config.text_config["model_type"] == "bloom":
        old = lm.transformer.word_embeddings_layernorm
        new = PreAppliedLayerNorm(old.normalized_shape, eps=old.eps, device=old.weight.device, dtype=old.weight.dtype)
        lm.transformer.word_embeddings_layernorm = new
    return lm


def build_vision_model(config: OwlConfig) -> nn.Module:
    """The image encoder the config names: upstream's ViT or a DINOv2 one."""
    if config.vision.model_type == DINOV2_MODEL_TYPE:
        return Dinov2VisionModel(config.vision.build_dinov2_config())
    return VisionModel(config.vision)


class OwlForConditionalGeneration(nn.Module):
    """The composed model. Parameter names match the released checkpoints key for key."""

    def __init__(self, config: OwlConfig):
        super().__init__()
        self.config = config
        self.vision_model = build_vision_model(config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.abstractor.hidden_size))
        if config.video:
            self.temporal_query_tokens = nn.Parameter(torch.zeros_like(self.query_tokens))
        self.language_model = build_language_model(config)
        self.abstractor = VisualAbstractor(
            config.abstractor, self.language_model.config.hidden_size, video=config.video
        )
        # BLOOM has ALiBi and no position ids; LLaMA-family models take them.
        lm_arguments = inspect.signature(self.language_model.forward).parameters
        self._lm_uses_positions = "position_ids" in lm_arguments
        # transformers 5.20 renamed the KV cache argument `past_key_values` to `cache`; earlier ones take the old name.
        self._lm_cache_argument = "cache" if "cache" in lm_arguments else "past_key_values"

    # --- loading and saving (implemented in openowl.loading: the model's one edge into the loader) -------

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        torch_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device = "cpu",
        revision: str | None = None,
        device_map: str | dict | None = None,
        max_memory: dict | None = None,
    ) -> OwlForConditionalGeneration:
        """Load a released (or our own) checkpoint from a folder or a hub id, in `dtype` (default float32), on
        `device`, or spread over several with `device_map` ("auto" or `{module: device}`; see `load_model`)."""
        from openowl import loading

        return loading.load_model(
            path_or_id, dtype=dtype or torch_dtype or torch.float32, device=device, revision=revision,
            device_map=device_map, max_memory=max_memory,
        )  # fmt: skip

    def save_pretrained(self, folder: str | Path, max_shard_size: str | int = "2GB") -> None:
        """Write sharded safetensors and config.json; they load back bit-identically."""
        from openowl import loading

        loading.save_model(self, folder, max_shard_size=max_shard_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.query_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    @property
    def num_visual_tokens(self) -> int:
        return self.config.num_visual_tokens

    # --- visual tokens -------------------------------------------------------------------------

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(N, 3, H, W)` pixels -> `(N, 65, D)` visual tokens in the LM's embedding space."""
        return self.abstract_images(self.vision_model(pixel_values.to(self.device)))  # ViT: (N, 257, C)

    def abstract_images(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """`(N, 257, C)` ViT outputs -> `(N, 65, D)` visual tokens: the learned queries read them through the
        abstractor. Apart from the ViT so that ViT outputs computed once (`openowl.train.features`) still train the
        abstractor."""
        queries = self.query_tokens.expand(vision_tokens.shape[0], -1, -1)
        return self.abstractor(queries, vision_tokens.to(self.device))

    def get_video_features(self, video_pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, 3, T, H, W)` frames -> `(B, 65, D)` visual tokens (one block per video)."""
        B, C, T, H, W = video_pixel_values.shape
        temporal = T > 1
        if temporal and not self.config.video:
            raise ValueError(f"this checkpoint has no temporal modules; it cannot encode {T}-frame videos")
        frames = video_pixel_values.to(self.device).transpose(1, 2).reshape(B * T, C, H, W)  # (B·T, C, H, W)
        tokens = self.vision_model(frames, num_frames=T)  # (B·T, N, Cv)
        tokens = tokens.reshape(B, T * tokens.shape[1], tokens.shape[2])  # (B, T·N, Cv)
        queries = self.query_tokens
        if temporal:
            queries = torch.cat([self.query_tokens, self.temporal_query_tokens], dim=1)  # (1, 2Q, C)
        return self.abstractor(queries.expand(B, -1, -1), tokens, temporal=temporal)

    # --- the splice ----------------------------------------------------------------------------

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings; placeholders (negative ids) look up id 0 and must be overwritten by the caller."""
        embeds = self.language_model.get_input_embeddings()(input_ids.clamp(min=0))
        if self.config.text_config["model_type"] == "bloom":
            embeds = self.language_model.transformer.word_embeddings_layernorm.normalize(embeds)
        return embeds

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        video_pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        video_features: torch.Tensor | None = None,
        vision_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`(B, L)` ids with placeholders -> `(B, L, D)` input embeddings with the visual tokens spliced in.

        Images fill the image placeholders in reading order (sample by sample, left to right); videos likewise.
        Pass precomputed `image_features` / `video_features` instead of pixels to reuse an encoding, or the images'
        ViT outputs `vision_tokens` `(N, 257, C)` (a feature cache's; cast to the model's dtype) to run only the
        abstractor on them.

        Raises:
            ValueError: when the placeholders and the images (or videos) given don't match in number, or when both
                pixels and ViT outputs are given for the images.
        """
        input_ids = input_ids.to(self.device)
        unknown = (input_ids < 0) & (input_ids != IMAGE_PLACEHOLDER_ID) & (input_ids != VIDEO_PLACEHOLDER_ID)
        if unknown.any():
            raise ValueError(f"input_ids contain negative ids other than the placeholders: {input_ids[unknown][:5]}")
        embeds = self.embed_text(input_ids)
        if pixel_values is not None and vision_tokens is not None:
            raise ValueError("give the images as pixel_values or as vision_tokens (their ViT outputs), not both")
        if image_features is None and pixel_values is not None:
            image_features = self.get_image_features(pixel_values)
        if image_features is None and vision_tokens is not None:
            image_features = self.abstract_images(vision_tokens.to(self.dtype))
        if video_features is None and video_pixel_values is not None:
            video_features = self.get_video_features(video_pixel_values)
        embeds = self._scatter(embeds, input_ids == IMAGE_PLACEHOLDER_ID, image_features, "image", IMAGE_TAG)
        return self._scatter(embeds, input_ids == VIDEO_PLACEHOLDER_ID, video_features, "video", VIDEO_TAG)

    def _scatter(
        self, embeds: torch.Tensor, mask: torch.Tensor, features: torch.Tensor | None, kind: str, tag: str
    ) -> torch.Tensor:
        per_item = self.num_visual_tokens
        n_slots = int(mask.sum())
        n_given = 0 if features is None else features.shape[0]
        if n_slots % per_item:
            raise ValueError(
                f"the prompt holds {n_slots} {kind} placeholder ids, not a multiple of {per_item}: a {tag} block was "
                "cut (truncation?) or the ids were built by hand"
            )
        if n_slots // per_item != n_given:
            raise ValueError(
                f"the prompt has {n_slots // per_item} {tag} placeholder(s) but {n_given} {kind}(s) were given"
            )
        if n_given == 0:
            return embeds
        features = features.to(device=embeds.device, dtype=embeds.dtype)  # devices differ under a device_map
        return embeds.masked_scatter(mask.to(embeds.device).unsqueeze(-1), features)

    # --- forward and generate ------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        video_pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        vision_tokens: torch.Tensor | None = None,
        **lm_kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits over the whole sequence; with `labels`, the mean next-token loss over labels that are ≥ 0.

        `labels` follow the transformers convention (same length as `input_ids`, shifted inside); negative labels
        (−100, or placeholder ids) are ignored. A batch whose labels are all ignored gets loss 0, not NaN.
        `vision_tokens`: the images' ViT outputs `(N, 257, C)` in reading order, instead of `pixel_values` (see
        `embed_inputs`). Other keyword arguments (`use_cache`, `logits_to_keep`, ...) go to the language model.
        """
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, video_pixel_values, vision_tokens=vision_tokens)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device=inputs_embeds.device, dtype=torch.long)
            if position_ids is None:  # from the mask: a left-padded row keeps positions 0..n-1
                position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]
        if position_ids is not None and self._lm_uses_positions:
            lm_kwargs["position_ids"] = position_ids
        if labels is not None:  # a loss forward: no KV cache to fill unless asked for
            lm_kwargs.setdefault("use_cache", False)
        lm_kwargs[self._lm_cache_argument] = cache
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **lm_kwargs)
        if labels is not None:
            out.loss = causal_lm_loss(out.logits, labels.to(out.logits.device))
        return out

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        video_pixel_values: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Generate from prompts with placeholders; returns only the new tokens `(B, new)`.

        The visual tokens are computed once, at prefill. Extra keyword arguments go to transformers' `generate`
        (`max_new_tokens`, `do_sample`, `top_k`, ...).
        """
        inputs_embeds = self.embed_inputs(input_ids, pixel_values, video_pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=inputs_embeds.device)
        generate_kwargs.setdefault("pad_token_id", self.language_model.config.pad_token_id)
        return self.language_model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask.to(inputs_embeds.device).long(),
            **generate_kwargs,
        )


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of `logits[:, t]` against `labels[:, t + 1]` over labels ≥ 0: their mean (0 when there are
    none), or with `reduction="sum"` their sum (for normalising over a whole distributed batch)."""
    targets = labels[:, 1:].masked_fill(labels[:, 1:] < 0, IGNORE_INDEX)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    total = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    if reduction == "sum":
        return total
    count = (targets != IGNORE_INDEX).sum()
    return total / count.clamp(min=1)
