"""Multi-token prediction: shapes and the information flow of REFERENCE.md's MTP forward."""

import torch

import deepmoe

from .conftest import v3_config


def test_mtp_depth_k_sees_tokens_up_to_i_plus_k_only():
    cfg = v3_config(num_nextn_predict_layers=2)
    model = deepmoe.build_model(cfg, seed=0).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))

    def mtp(ids):
        with torch.no_grad():
            return model.mtp_logits(model.hidden_states(ids), ids)

    base = mtp(x)
    assert [t.shape for t in base] == [(1, 15, cfg.vocab_size), (1, 14, cfg.vocab_size)]
    i = 5
    for k, logits in enumerate(base, start=1):
        # changing token i+k changes depth k's prediction at position i (it is that position's input
        # embedding) but nothing before it
        y = x.clone()
        y[0, i + k] = (y[0, i + k] + 1) % cfg.vocab_size
        changed = mtp(y)[k - 1]
        assert not torch.allclose(changed[0, i], logits[0, i])
        torch.testing.assert_close(changed[0, :i], logits[0, :i], rtol=0, atol=1e-6)


def test_mtp_uses_embedding_first_in_the_concat():
    cfg = v3_config()
    model = deepmoe.build_model(cfg, seed=0).eval()
    m = model.mtp[0]
    emb, h = torch.randn(1, 4, cfg.hidden_size), torch.randn(1, 4, cfg.hidden_size)
    with torch.no_grad():
        m.eh_proj.weight[:, cfg.hidden_size:] = 0  # keep only the first half of the concat
        cos, sin = model.rope(4, 0, "cpu")
        a = m(h, emb, cos, sin)
        b = m(torch.randn_like(h), emb, cos, sin)  # another hidden state, same embedding
    assert torch.equal(a, b)
