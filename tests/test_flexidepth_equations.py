"""One FlexiDepth layer against the paper's equations, written out here with plain tensor algebra from the layer's
weight matrices, never through route / run_branch / skip_branch / masked or any model module's forward:

    n   = input_norm(h)                          w = sigmoid(router(n)),  router = head(dec(tanh(norm_r(enc(n)))))
    run  (w > threshold): h1 = h + attn(n);      out = h1 + w * mlp(post_norm(h1))
    skip (otherwise):                            out = h  + (1 - w) * adapter(post_norm(h))
    every token, run or skip, writes its K/V (from n) to the cache.

Why it can fail: with random router weights w is far from 0.5 for most tokens, so swapping w and 1 - w changes
both branches' outputs; the norms carry random (not unit) weights, so feeding the adapter input_norm(h) instead of
post_norm(h), or h1 through the wrong norm, changes them too; and a skipped token whose K/V were not written
leaves the cache row zero, which the cache comparison and the next token's attention both see. (Checked by
mutating model.py that way, each mutation fails this test.)"""
import pytest
import torch

from model import FlexiDepthBlock, ModelArgs, Transformer

ROUTED = 1
T = 7  # prompt tokens (masking form), then one decoded token (real skip) at position T


def rms(x, weight, eps):
    return weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def rope(x, positions, base):
    """Rotate-half rope on [tokens, heads, head_dim] (the Hugging Face Llama row layout)."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None].float(), torch.cat([angles.sin()] * 2, -1)[:, None].float()
    rotated = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rotated * sin


def reference_layer(layer, args, h, threshold):
    """The equations above over h [T, dim] (positions 0..T-1, causal). Returns (out, w, k, v)."""
    W = lambda linear: linear.weight  # noqa: E731
    silu = torch.nn.functional.silu
    eps, heads, head_dim = args.norm_eps, args.n_heads, args.head_dim
    positions = torch.arange(h.shape[0])
    n = rms(h, W(layer.attention_norm), eps)
    r = layer.router
    w = torch.sigmoid(torch.tanh(rms(n @ W(r.enc).T, W(r.norm), eps)) @ W(r.dec).T @ W(r.head).T)  # [T, 1]
    q = rope((n @ W(layer.attention.wq).T).view(-1, heads, head_dim), positions, args.rope_base)
    k = rope((n @ W(layer.attention.wk).T).view(-1, heads, head_dim), positions, args.rope_base)
    v = (n @ W(layer.attention.wv).T).view(-1, heads, head_dim)
    scores = torch.einsum("qhd,khd->hqk", q, k) / head_dim ** 0.5
    scores = scores.masked_fill(~torch.ones(len(h), len(h), dtype=torch.bool).tril(), float("-inf"))
    attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(len(h), -1) @ W(layer.attention.wo).T
    h1 = h + attn
    f = layer.feed_forward
    m = rms(h1, W(layer.ffn_norm), eps)
    run_out = h1 + w * ((silu(m @ W(f.w1).T) * (m @ W(f.w3).T)) @ W(f.w2).T)
    a, p = layer.adapter, rms(h, W(layer.ffn_norm), eps)
    skip_out = h + (1 - w) * ((silu(p @ W(a.gate_proj).T) * (p @ W(a.down_proj).T)) @ W(a.up_proj).T)
    return torch.where(w > threshold, run_out, skip_out), w, k, v


@pytest.fixture(scope="module")
def model():
    args = ModelArgs(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, intermediate_size=128,
                     rope_base=10000.0, max_position_embeddings=32, routing_layers=[ROUTED], router_dim=4,
                     adapter_dim=8)
    torch.manual_seed(0)
    model = Transformer(args).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        p.copy_(1 + 0.5 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) / p.shape[-1] ** 0.5)
    assert isinstance(model.layers[ROUTED], FlexiDepthBlock)
    return model


def test_routed_layer_follows_the_equations(model):
    layer, args = model.layers[ROUTED], model.args
    h = torch.randn(T + 1, args.dim, generator=torch.Generator().manual_seed(1))
    _, w, _, _ = reference_layer(layer, args, h, 0.5)
    threshold = float(w[:T].median())  # about half the prompt tokens run, half skip
    expected, w, k, v = reference_layer(layer, args, h, threshold)
    runs = (w[:T, 0] > threshold).tolist()
    assert any(runs) and not all(runs)
    assert ((w - 0.5).abs() > 0.05).float().mean() > 0.5  # w far from 1 - w for most tokens
    model.setup_caches(1, 16)

    # the prompt: masking form, T tokens at once
    out = model.run_layers(h[None, :T], torch.arange(T), ROUTED, ROUTED + 1, threshold)[0]
    torch.testing.assert_close(out, expected[:T], atol=1e-5, rtol=1e-5)
    # the next token: real skip (one token, only the chosen branch runs), both ways
    for decode_threshold in (0.0, 1.0):  # w > 0 always runs, w > 1 never
        expected_last, _, _, _ = reference_layer(layer, args, h, decode_threshold)
        out = model.run_layers(h[None, T:], torch.tensor([T]), ROUTED, ROUTED + 1, decode_threshold)[0]
        torch.testing.assert_close(out[0], expected_last[T], atol=1e-5, rtol=1e-5)
        assert bool(layer.ran[0, T]) == (decode_threshold == 0.0)
    # K/V of every token, skipped or not, in the cache
    cache = layer.attention.kv_cache
    torch.testing.assert_close(cache.k_cache[0, :, :T + 1], k.transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.v_cache[0, :, :T + 1], v.transpose(0, 1), atol=1e-5, rtol=1e-5)
    assert layer.ran[0, :T].tolist() == runs
