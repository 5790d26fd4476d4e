"""The toy evaluator's image tower: a small convolutional network, registered with transformers' Auto classes.

The evaluator is a stock `VisionTextDualEncoderModel` (CLIP's interface: `get_image_features`, `get_text_features`,
`logit_scale`) whose text tower is a `CLIPTextModel` and whose image tower is `GlyphCNNModel`. A ViT trained from
scratch on 64 px glyphs read colour and context but left the outer shape near chance (38 % after 2,900 steps); ConvNeXt,
MobileNetV2 and ResNet heads trained alone stayed at 20–40 % for 300 steps, where this network (full-resolution 3×3
convolutions, batch norm, max pooling) reached 98 %. Loading it needs only `import cidm.toyworld.evaluator` first.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling


class GlyphCNNConfig(PretrainedConfig):
    model_type = "cidm-glyph-cnn"

    def __init__(self, num_channels: int = 3, widths: tuple[int, ...] = (32, 64, 128, 128), **kwargs):
        self.num_channels = num_channels
        self.widths = list(widths)
        self.hidden_size = 2 * self.widths[-1]  # max- and mean-pooled features side by side
        kwargs.pop("hidden_size", None)
        super().__init__(**kwargs)


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class GlyphCNNModel(PreTrainedModel):
    """Stages of two 3×3 convolutions, halving the resolution between stages (64 -> 8 px at four stages); the image
    feature is the global max pool (where a part of the glyph is) beside the global mean pool (the scene)."""

    config_class = GlyphCNNConfig
    main_input_name = "pixel_values"

    def __init__(self, config: GlyphCNNConfig):
        super().__init__(config)
        widths = [config.num_channels, *config.widths]
        stages = []
        for i, (c_in, c_out) in enumerate(zip(widths, widths[1:])):
            stages.append(nn.Sequential(nn.MaxPool2d(2) if i else nn.Identity(), conv_block(c_in, c_out),
                                        conv_block(c_out, c_out)))
        self.stages = nn.Sequential(*stages)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True, **kwargs) -> BaseModelOutputWithPooling:
        features = self.stages(pixel_values)  # (B, C, h, w)
        pooled = torch.cat([features.amax(dim=(2, 3)), features.mean(dim=(2, 3))], dim=1)
        return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=pooled)


AutoConfig.register(GlyphCNNConfig.model_type, GlyphCNNConfig, exist_ok=True)
AutoModel.register(GlyphCNNConfig, GlyphCNNModel, exist_ok=True)


def make_evaluator(text_config: dict, projection_dim: int = 128):
    """A dual encoder: GlyphCNN image tower, CLIP text tower (`text_config`: CLIPTextConfig's arguments)."""
    from transformers import CLIPTextConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    config = VisionTextDualEncoderConfig.from_vision_text_configs(GlyphCNNConfig(), CLIPTextConfig(**text_config),
                                                                  projection_dim=projection_dim)
    return VisionTextDualEncoderModel(config)
