"""FlashSelfAttention, compat.flash_attn and patch_attention on small randomly initialised HF models."""

import copy
import logging

import pytest
import torch

import zigspark
from zigspark.compat.flash_attn import flash_attn_func
from zigspark.nn import FlashSelfAttention

from numerics import assert_by_rule

pytestmark = pytest.mark.cpu


def hf():
    """transformers, for the patch_attention tests only (the layer and compat tests do without it)."""
    return pytest.importorskip("transformers", reason="patch_attention tests need transformers")


def test_flash_self_attention_matches_manual_attention():
    torch.manual_seed(0)
    layer = FlashSelfAttention(32, heads=4).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    out, received = layer(x, return_received=True, exclude_queries=[0])
    q, k, v = layer.qkv(x).reshape(2, 9, 3, 4, 8).unbind(2)
    p = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) / 8 ** 0.5, -1)
    manual = layer.proj(torch.einsum("bhij,bjhd->bihd", p, v).reshape(2, 9, 32))
    torch.testing.assert_close(out, manual)
    torch.testing.assert_close(received, p[:, :, 1:].sum(2).mean(1))


def test_flash_attn_func_signature_and_unsupported_arguments():
    q = k = v = torch.randn(1, 6, 2, 16)
    torch.testing.assert_close(flash_attn_func(q, k, v, causal=True), zigspark.flash_attention(q, k, v, causal=True))
    out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True)
    assert lse.shape == (1, 2, 6) and probs is None
    for kwargs, name in ((dict(dropout_p=0.1), "dropout_p"), (dict(window_size=(4, 0)), "window_size"),
                         (dict(softcap=30.0), "softcap"), (dict(alibi_slopes=torch.ones(2)), "alibi_slopes")):
        with pytest.raises(NotImplementedError, match=name):
            flash_attn_func(q, k, v, **kwargs)


def _bert():
    transformers = hf()
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64)
    return transformers.BertModel(config).eval()


def _vit():
    transformers = hf()
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64)
    return transformers.ViTModel(config).eval()


@pytest.mark.parametrize("make,inputs", [(_bert, lambda: torch.randint(0, 100, (2, 12))),
                                         (_vit, lambda: torch.randn(2, 3, 32, 32))], ids=["bert", "vit"])
def test_patch_attention_keeps_outputs_within_the_numerics_rule(make, inputs):
    torch.manual_seed(0)
    model, x = make(), inputs()
    eager64 = copy.deepcopy(model).double()
    x64 = x.double() if x.is_floating_point() else x
    ref64 = eager64(x64).last_hidden_state
    ref32 = model(x).last_hidden_state
    zigspark.patch_attention(model)
    zigspark.backends._last.pop("flash_attention", None)
    out = model(x).last_hidden_state
    assert zigspark.last_backends().get("flash_attention") is not None, "the patched model did not call zigspark"
    assert_by_rule(out.detach(), ref64.detach(), ref32.detach(), what="patched model")


def test_patch_attention_with_padding_mask_falls_back_once(caplog):
    torch.manual_seed(1)
    model = _bert()
    ids = torch.randint(0, 100, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    ref = model(ids, attention_mask=mask).last_hidden_state
    zigspark.patch_attention(model)
    with caplog.at_level(logging.WARNING, logger="zigspark"):
        out = model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert any("attention mask" in r.getMessage() for r in caplog.records)
