"""NOAH MobileNetV3-Small: timm's MobileNetV3 with a NOAH head over its per-position head conv.

timm's MobileNetV3 pools the final map, then runs a 1x1 conv + hard-swish (`conv_head`, `act2`) and the
classifier. As in the NOAH authors' MobileNetV3, `noah_mobilenetv3_small_100` runs that conv at every
position instead and NOAH (N=8, r=1/4, value dropout 0.2) attends over its output.

The authors' MobileNetV3-Small is not timm's: its last conv has 1280 channels (timm: 1024), its squeeze-
excite layers have no biases and sit before the activation, and its first block has an expansion conv.
It has 2.94M parameters where timm's has 2.54M, so its checkpoints do not fit timm's architecture.
"""
from typing import Any

from timm.models import generate_default_cfgs, register_model
from timm.models.mobilenetv3 import MobileNetV3, _gen_mobilenet_v3

from ._twins import NOAH_PAPER, build_noah_twin, sibling_cfgs

_NOAH_ARGS = dict(noah_head_num=8, key_ratio=1 / 4, head_drop_rate=0.2)

default_cfgs = generate_default_cfgs(
    sibling_cfgs('noah_mobilenetv3_small_100', 'mobilenetv3_small_100', paper_ids=NOAH_PAPER))


@register_model
def noah_mobilenetv3_small_100(pretrained: bool = False, **kwargs: Any) -> MobileNetV3:
    """timm's MobileNetV3-Small 1.0x with a NOAH head (N=8, r=1/4; 2.56M params, see the module notes)."""
    def build(name, pretrained=False, **kw):
        return _gen_mobilenet_v3(name, 1.0, pretrained=pretrained, **kw)

    return build_noah_twin(build, 'noah_mobilenetv3_small_100', pretrained, _NOAH_ARGS, **kwargs)
