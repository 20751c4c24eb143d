"""--head-init-scale / --head-init-bias for a NOAH head: NoahHead.init_scaled (docs/head.md)."""
import pytest
import timm
import torch

import noah_mlp  # noqa: F401
from noah_mlp import NoahHead


@pytest.mark.parametrize('kv_split,head_split', [(True, True), (False, True), (True, False)])
def test_bias_sets_every_logit_exactly_with_zero_features(kv_split, head_split):
    torch.manual_seed(0)
    head = NoahHead(32, 7, num_heads=4, kv_split=kv_split, head_split=head_split).eval()
    head.init_scaled(bias=-2.5)
    logits = head(torch.zeros(3, 10, 32))
    torch.testing.assert_close(logits, torch.full((3, 7), -2.5), rtol=0, atol=1e-6)
    torch.testing.assert_close(head.value.bias, torch.full((28,), -2.5 / 4))


def test_scale_multiplies_the_logits_and_keeps_the_attention():
    torch.manual_seed(0)
    head = NoahHead(32, 5, num_heads=4).eval()
    x = torch.randn(2, 9, 32)
    before, scores = head(x), head.attention_logits(x)
    head.init_scaled(scale=0.01)
    torch.testing.assert_close(head(x), before * 0.01, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head.attention_logits(x), scores)  # query projection untouched


def test_scale_then_bias_as_in_timm():
    # timm multiplies weight and bias by the scale, then sets the bias: logits = scale * (Wv-part) + bias
    torch.manual_seed(0)
    head = NoahHead(16, 3, num_heads=2).eval()
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        head.value.bias.zero_()
    unbiased = head(x)
    head.init_scaled(scale=0.5, bias=1.0)
    torch.testing.assert_close(head(x), unbiased * 0.5 + 1.0, rtol=1e-5, atol=1e-6)


def test_model_head_init_through_get_classifier():
    model = timm.create_model('noah_mixer_s16_224', num_blocks=1, embed_dim=32, patch_size=4, img_size=16,
                              num_classes=3).eval()
    model.get_classifier().init_scaled(scale=0., bias=0.7)
    torch.testing.assert_close(model(torch.randn(2, 3, 16, 16)), torch.full((2, 3), 0.7), rtol=0, atol=1e-6)
