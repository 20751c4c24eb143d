"""Model registrations, one module per family as in timm (`timm.models.mlp_mixer`, ...).

A family's module name is the name timm records for its models (`timm.list_models(module='mlp_mixer')`
lists the NOAH Mixer / ResMLP / gMLP twins next to timm's own), so timm's module-based filters and
tests find them where they find the stock siblings.
"""
from .mlp_mixer import BASELINE_MODEL_ARGS, NOAH_MODEL_ARGS, NoahMlpMixer
# register the NOAH CNN / DeiT rows and the with_noah_head entrypoint
from . import adapted, efficientnet, mobilenetv3, resnet, vision_transformer  # noqa: F401

__all__ = ['BASELINE_MODEL_ARGS', 'NOAH_MODEL_ARGS', 'NoahMlpMixer']
