"""The real default model (SmolLM2-135M-Instruct, fp32): our greedy generation equals HF transformers'
model.generate(do_sample=False) token for token, eager and compiled."""
import pytest
import torch

import generate
from tokenizer import load_tokenizer

MAX_NEW_TOKENS = 64
CACHE_LENGTH = 160  # one cache size for every prompt, so the compiled decode step compiles once


@pytest.fixture(scope="module")
def default_model(default_checkpoint):
    from transformers import AutoModelForCausalLM
    tokenizer = load_tokenizer(default_checkpoint.parent)
    model = generate.load_model(default_checkpoint, "cpu", torch.float32)
    model.setup_caches(1, CACHE_LENGTH)
    hf = AutoModelForCausalLM.from_pretrained(default_checkpoint.parent, dtype=torch.float32).eval()
    chat = tokenizer.apply_chat_template([dict(role="user", content="What is the capital of France?")])
    prompts = {
        "chat": tokenizer.encode(chat, add_special_tokens=False),
        "plain": tokenizer.encode("The three most important inventions of the nineteenth century were"),
    }
    expected = {name: hf_greedy(hf, ids, tokenizer.eos_ids) for name, ids in prompts.items()}
    return model, tokenizer, prompts, expected


def hf_greedy(hf, prompt_ids, eos_ids):
    """HF greedy decoding with the same stopping rule as ours: stop after the first eos, which is kept."""
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, top_k=None,
                          top_p=None, temperature=None, max_new_tokens=MAX_NEW_TOKENS,
                          eos_token_id=sorted(eos_ids), pad_token_id=sorted(eos_ids)[0])
    return out[0, len(prompt_ids):].tolist()


def ours_greedy(model, prompt_ids, eos_ids, steps=None):
    tokens, stats = generate.generate(model, torch.tensor(prompt_ids), MAX_NEW_TOKENS, steps=steps, eos_ids=eos_ids)
    assert stats.new_tokens == len(tokens)
    return tokens.tolist()


def check_answers(outputs, default_model):
    model, tokenizer, prompts, expected = default_model
    for name in prompts:
        assert outputs[name] == expected[name], f"{name}: {tokenizer.decode(outputs[name])!r} vs " \
                                                f"{tokenizer.decode(expected[name])!r}"
    assert "Paris" in tokenizer.decode(outputs["chat"])
    assert outputs["chat"][-1] in tokenizer.eos_ids  # the answer ends by itself, well inside 64 tokens
    assert len(outputs["plain"]) == MAX_NEW_TOKENS  # a continuation that runs the whole length


def test_eager_greedy_matches_hf(default_model):
    model, tokenizer, prompts, _ = default_model
    check_answers({name: ours_greedy(model, ids, tokenizer.eos_ids) for name, ids in prompts.items()}, default_model)


def test_compiled_greedy_matches_hf(default_model):
    import torch._inductor.config as inductor_config
    model, tokenizer, prompts, _ = default_model
    freezing = inductor_config.freezing
    try:
        steps = generate.compile_steps("cpu", False)
        outputs = {name: ours_greedy(model, ids, tokenizer.eos_ids, steps) for name, ids in prompts.items()}
    finally:
        inductor_config.freezing = freezing  # compile_steps sets it process-wide; leave other tests as they were
    check_answers(outputs, default_model)
