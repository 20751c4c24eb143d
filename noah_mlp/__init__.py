"""noah_mlp: NOAH heads for MLP vision backbones, as a timm plugin.

Importing the package registers the NOAH Mixer / ResMLP / gMLP models (and the width-scaled
baselines timm lacks) in timm's model registry: `timm.create_model('noah_gmlp_ti16_224')`, and the
NOAH authors' CNN / DeiT rows (`noah_resnet50`, `noah_mobilenetv2_100`, `noah_deit_small_patch16_224`, ...).
`add_noah_head(model)` puts a NOAH head on any other timm classification model.
"""
from .adapt import add_noah_head
from .attention import NoahAttention, attention_maps, noah_attention
from .head import NoahHead, noah_split_sizes
from .models import NoahMlpMixer

__version__ = '0.1.0'
__all__ = [
    'NoahAttention', 'NoahHead', 'NoahMlpMixer', 'add_noah_head', 'attention_maps', 'noah_attention', 'noah_split_sizes',
    '__version__',
]
