"""noah_mlp: NOAH heads for MLP vision backbones, as a timm plugin.

Importing the package registers the NOAH Mixer / ResMLP / gMLP models (and the width-scaled
baselines timm lacks) in timm's model registry: `timm.create_model('noah_gmlp_ti16_224')`.
"""
from .attention import NoahAttention, attention_maps, noah_attention
from .head import NoahHead, noah_split_sizes
from .models import NoahMlpMixer

__version__ = '0.1.0'
__all__ = [
    'NoahAttention', 'NoahHead', 'NoahMlpMixer', 'attention_maps', 'noah_attention', 'noah_split_sizes',
    '__version__',
]
