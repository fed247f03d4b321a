"""Self-speculative (LayerSkip early exit) and draft-model speculative decoding against plain decoding."""
import re

import pytest
import torch

import generate as g
from conftest import assert_one_line_error, greedy, make_converted_llama, run_cli, with_exit_heads


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_converted_llama(tmp_path_factory.mktemp("tiny"), num_hidden_layers=6, vocab_size=96)
    return g.load_model(path, "cpu", torch.float32)


def test_self_speculative_equals_greedy_tiny_every_exit(tiny):
    prompt = torch.tensor([3, 17, 42, 5, 9])
    reference, _ = greedy(tiny, prompt, 64)
    accepted_any = 0
    for early_exit in range(1, tiny.args.n_layers):
        for k in (1, 2, 4, 8):
            out, stats = greedy(tiny, prompt, 64, early_exit=early_exit, speculate_k=k)
            assert out == reference, f"E={early_exit} k={k}: first mismatch at " \
                f"{next(i for i, (a, b) in enumerate(zip(out, reference)) if a != b)}"
            accepted_any += sum(stats.accepted)
    assert accepted_any > 0  # some drafts were accepted, so the multi-token path was exercised


def test_adaptive_k_equals_greedy_and_varies(tiny):
    prompt = torch.tensor([1, 2, 3])
    reference, _ = greedy(tiny, prompt, 64)
    out, stats = greedy(tiny, prompt, 64, early_exit=4, speculate_k=8, adaptive_k=True)
    assert out == reference
    assert len(set(stats.speculate_k)) > 1


def test_draft_model_equals_greedy_tiny(tiny, tmp_path):
    other = g.load_model(make_converted_llama(tmp_path / "draft", seed=1, num_hidden_layers=2, vocab_size=96),
                         "cpu", torch.float32)
    prompt = torch.tensor([3, 17, 42, 5, 9])
    reference, _ = greedy(tiny, prompt, 48)
    for draft in (other, tiny.__class__(tiny.args)):  # a different model, and an untrained copy
        if draft is not other:
            draft.load_state_dict(tiny.state_dict())  # the same weights: every draft must be accepted
        draft.eval().requires_grad_(False)
        for k in (1, 3):
            draft.setup_caches(1, 64)
            out, stats = greedy(tiny, prompt, 48, draft_model=draft, speculate_k=k)
            assert out == reference
            if draft is not other:
                assert all(n == s for n, s in zip(stats.accepted[:-1], stats.speculate_k))


def test_verify_runs_layers_below_exit_for_one_token(tiny):
    """The cache reuse is real: per speculation step, layers < E see k one-token draft calls plus one token in
    verify; layers >= E see only the verify rows."""
    E, k = 3, 4
    calls = {i: [] for i in range(tiny.args.n_layers)}
    hooks = [layer.register_forward_hook(lambda m, inp, out, i=i: calls[i].append(inp[0].shape[1]))
             for i, layer in enumerate(tiny.layers)]
    try:
        _, stats = greedy(tiny, torch.tensor([1, 2, 3, 4]), 20, early_exit=E, speculate_k=k)
    finally:
        for h in hooks:
            h.remove()
    steps = len(stats.accepted)
    drafts = sum(stats.speculate_k)
    for i in range(E):
        assert calls[i][0] == 4  # prefill
        assert calls[i][1:] == [1] * (drafts + steps)  # every call after prefill is a single token
    for i in range(E, tiny.args.n_layers):
        assert calls[i][1:] == [k + 1] * steps  # layers above the exit run only in verify


@pytest.mark.parametrize("draft", ["plain exit", "exit head, trimmed vocabulary"])
def test_speculative_sampling_matches_plain_sampling(tmp_path, draft):
    """Tokens 2 and 3 come from one speculation step (k=2); their joint distribution must be the model's own.
    The same check with a wrong acceptance rule (always accept the draft) must fail. The second case drafts through
    an affine exit head and an LM head of 5 of the 8 tokens (draft probability 0 for the other 3)."""
    model = g.load_model(make_converted_llama(tmp_path, seed=3, num_hidden_layers=4, vocab_size=8), "cpu",
                         torch.float32)
    if draft != "plain exit":
        model = with_exit_heads(model, [1], torch.tensor([0, 2, 3, 5, 6]))
    prompt = torch.tensor([1, 5])
    V, E, draws = 8, 1, 2000
    # exact joint distribution of (t2, t3), marginalising t1
    model.setup_caches(V * V, 8)
    with torch.no_grad():
        t1, t2 = torch.meshgrid(torch.arange(V), torch.arange(V), indexing="ij")
        seqs = torch.cat([prompt.expand(V * V, 2), t1.reshape(-1, 1), t2.reshape(-1, 1)], dim=1)
        probs = torch.softmax(model(seqs, torch.arange(4)).double(), dim=-1)
    p1 = probs[0, 1]  # P(t1 | prompt)
    p2 = probs[:, 2].view(V, V, V)  # P(t2 | t1) indexed [t1, t2, :] rows identical over t2
    p3 = probs[:, 3].view(V, V, V)  # P(t3 | t1, t2)
    exact = (p1[:, None, None] * p2[:, 0, :, None] * p3).sum(0)  # [t2, t3]

    def chi_square(accept_rule, draws):
        original = g.speculative_accept
        g.speculative_accept = accept_rule
        try:
            counts = torch.zeros(V, V)
            sampling = g.Sampling(temperature=1.0, seed=0)
            model.setup_caches(1, 16)
            for _ in range(draws):
                out, _ = g.generate(model, prompt, 3, sampling, early_exit=E,
                                    speculate_k=2)
                counts[out[1], out[2]] += 1
        finally:
            g.speculative_accept = original
        expected = exact * draws
        keep = expected > 5  # pool the rare cells
        stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
        stat += (counts[~keep].sum() - expected[~keep].sum()) ** 2 / max(expected[~keep].sum(), 1e-9)
        return float(stat), int(keep.sum())

    def accept_everything(draft_tokens, draft_probs, target_probs, sampling):
        k = draft_tokens.shape[0]
        return k, sampling.draw(target_probs[k])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny steps: threading only adds overhead
    try:
        stat, cells = chi_square(g.speculative_accept, draws)
        wrong, wrong_cells = chi_square(accept_everything, draws // 2)
    finally:
        torch.set_num_threads(threads)
    # chi-square with `cells` degrees of freedom: mean = dof, sd = sqrt(2 dof); 5 sd is p < 1e-5
    print(f"chi2 correct rule {stat:.1f} over {cells} cells; wrong rule {wrong:.1f} over {wrong_cells}")
    assert stat < cells + 5 * (2 * cells) ** 0.5, f"chi2 {stat:.1f} over {cells} cells"

    assert wrong > wrong_cells + 5 * (2 * wrong_cells) ** 0.5, f"a wrong acceptance rule passed: chi2 {wrong:.1f}"


# ---------------------------------------------------------------- the real default model

PROMPT = "Write a Python function that checks whether a number is prime."


@pytest.fixture(scope="module")
def default_model(default_checkpoint):
    from tokenizer import load_tokenizer
    tokenizer = load_tokenizer(default_checkpoint.parent)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    prompt = torch.tensor(tokenizer.encode(text, add_special_tokens=False))
    model = g.load_model(default_checkpoint, "cpu", torch.float32)
    reference, _ = greedy(model, prompt, 64)
    return model, prompt, reference


@pytest.mark.parametrize("early_exit", [4, 8, 15])
@pytest.mark.parametrize("k", [2, 4])
def test_self_speculative_equals_greedy_default_model(default_model, early_exit, k):
    model, prompt, reference = default_model
    out, _ = greedy(model, prompt, 64, early_exit=early_exit, speculate_k=k)
    assert out == reference


def test_self_speculative_compiled_equals_greedy_default_model(default_model, monkeypatch):
    """The steps a user's machine with AVX-512 compiles, the kernels (a layer in one call) where they build. Without
    them the verify's linears are F.linear in frozen graphs, which took 70 s a graph to compile on an AMD EPYC (frozen
    graphs are not cached); the tiny models' tests cover that path."""
    import cpu_kernels
    import model as model_code
    if cpu_kernels.load():
        monkeypatch.setattr(model_code, "ONE_TOKEN_LINEAR", {("torch.float32", False): "kernel"})
        monkeypatch.setattr(model_code, "FEW_ROW_LINEAR", {"torch.float32": "kernel"})
    model, prompt, reference = default_model
    steps = g.compile_steps("cpu", compile_prefill=False)
    for k in (2, 4):  # one E: each early exit is its own compiled graph (minutes on 2 cores)
        out, _ = greedy(model, prompt, 64, steps=steps, early_exit=8, speculate_k=k)
        assert out == reference


def test_draft_model_bf16_copy_equals_greedy_default_model(default_model, default_checkpoint):
    model, prompt, reference = default_model
    draft = g.load_model(default_checkpoint, "cpu", torch.bfloat16)
    draft.setup_caches(1, len(prompt) + 64 + 4)
    out, stats = greedy(model, prompt, 64, draft_model=draft, speculate_k=3)
    assert out == reference
    assert sum(stats.accepted) / len(stats.accepted) > 1.5  # a bf16 copy agrees with fp32 almost always


@pytest.mark.parametrize("flags, message", [
    (["--self_speculative", "--early_exit", "0"], "--early_exit must be in 1..29"),
    (["--self_speculative", "--early_exit", "30"], "--early_exit must be in 1..29"),
    (["--self_speculative"], "--early_exit must be in 1..29"),
    (["--self_speculative", "--early_exit", "4", "--speculate_k", "0"], "--speculate_k must be at least 1"),
    (["--self_speculative", "--early_exit", "4", "--speculate_k", "many"], "--speculate_k must be"),
    (["--self_speculative", "--early_exit", "4", "--max_new_tokens", "8190"], "context is 8192"),
])
def test_bad_speculation_flags(default_checkpoint, flags, message):
    result = run_cli("generate.py", "--checkpoint_path", default_checkpoint, "--temperature", "0", *flags)
    assert_one_line_error(result, re.escape(message))


def test_draft_model_with_other_vocabulary_refused(default_checkpoint, tmp_path):
    draft = make_converted_llama(tmp_path, vocab_size=256)
    result = run_cli("generate.py", "--checkpoint_path", default_checkpoint, "--draft_checkpoint_path", draft,
                     "--max_new_tokens", "4")
    assert_one_line_error(result, "vocabulary")
