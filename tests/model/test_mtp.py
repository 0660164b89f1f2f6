"""The MTP block (checkpoint layer num_hidden_layers): weight sharing, shapes, a hand-computed forward."""

import torch
import torch.nn.functional as F

from glm5 import GLM5ForCausalLM, preset
from glm5.model.cache import build_attention_mask


def _model():
    return GLM5ForCausalLM(preset("glm5-nano")).init_weights(0).eval()


def test_mtp_has_no_embedding_or_head_of_its_own():
    m = _model()
    n = m.config.num_hidden_layers
    names = [k for k in m.state_dict() if k.startswith(f"model.layers.{n}.")]
    assert f"model.layers.{n}.eh_proj.weight" in names
    assert f"model.layers.{n}.enorm.weight" in names and f"model.layers.{n}.hnorm.weight" in names
    assert f"model.layers.{n}.shared_head.norm.weight" in names
    assert not any("embed_tokens" in k or "shared_head.head" in k for k in names)
    assert m.model.mtp.eh_proj.weight.shape == (m.config.hidden_size, 2 * m.config.hidden_size)


def test_mtp_shares_embedding_and_lm_head():
    m = _model()
    x = torch.randint(0, m.config.vocab_size, (1, 10))
    pos = torch.arange(10)[None]
    mask = build_attention_mask(1, 10, 0, x.device)
    with torch.no_grad():
        h = m(x).hidden_states
        a, _ = m.mtp_forward(h, x, pos, mask)
        m.lm_head.weight.mul_(2.0)  # changing the main head must change MTP logits exactly
        b, _ = m.mtp_forward(h, x, pos, mask)
    torch.testing.assert_close(b, 2 * a, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        m.model.embed_tokens.weight[x[0, 3]].add_(1.0)  # and the shared embedding feeds it
        c, _ = m.mtp_forward(h, x, pos, mask)
    assert not torch.allclose(b, c)


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_mtp_forward_by_hand():
    m = _model()
    cfg = m.config
    mtp = m.model.mtp
    B, S = 2, 9
    torch.manual_seed(1)
    h_prev = torch.randn(B, S, cfg.hidden_size)
    nxt = torch.randint(0, cfg.vocab_size, (B, S))
    pos = torch.arange(S)[None].expand(B, S)
    mask = build_attention_mask(B, S, 0, nxt.device)
    with torch.no_grad():
        logits, h = m.mtp_forward(h_prev, nxt, pos, mask, dsa="dense")
        eps = cfg.rms_norm_eps
        e = _rms(F.embedding(nxt, m.model.embed_tokens.weight), mtp.enorm.weight, eps)
        hh = _rms(h_prev, mtp.hnorm.weight, eps)
        z = torch.cat([e, hh], -1) @ mtp.eh_proj.weight.T  # embedding first, then hidden
        # the decoder block of the MTP layer is an ordinary GLM-5 decoder layer (tested for parity elsewhere)
        from glm5.model.cache import AttentionContext
        from glm5.model.transformer import DecoderLayer
        z = DecoderLayer.forward(mtp, z, m.model.rotary(pos, z.dtype), AttentionContext(mask=mask, dsa="dense"))
        ref = _rms(z, mtp.shared_head.norm.weight, eps) @ m.lm_head.weight.T
    assert logits.shape == (B, S, cfg.vocab_size) and h.shape == (B, S, cfg.hidden_size)
    torch.testing.assert_close(h, z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_mtp_recursive_steps_reuse_one_layer():
    m = _model()
    x = torch.randint(0, m.config.vocab_size, (1, 12))
    pos = torch.arange(12)[None]
    mask = build_attention_mask(1, 12, 0, x.device)
    with torch.no_grad():
        h0 = m(x).hidden_states
        l1, h1 = m.mtp_forward(h0, x.roll(-1, 1), pos, mask)
        l2, h2 = m.mtp_forward(h1, x.roll(-2, 1), pos, mask)
    assert l1.shape == l2.shape and not torch.allclose(l1, l2)
    assert sum(1 for k in m.state_dict() if k.endswith("eh_proj.weight")) == 1


def test_model_without_mtp():
    m = GLM5ForCausalLM(preset("glm5-nano", num_nextn_predict_layers=0))
    assert m.model.mtp is None and len(m.model.layers) == m.config.num_hidden_layers
