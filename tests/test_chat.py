"""Interactive chat (`generate.py --chat` without --prompt) driven through a pipe: three turns, an overflowing turn,
/reset; the second turn prefills only what the cache does not hold, and every answer equals generate() on the whole
conversation prefilled from scratch (fp32 greedy), also under self-speculation."""
import re

import pytest
import torch

from chat import common_prefix
from conftest import run_cli
from generate import generate, load_model
from tokenizer import load_tokenizer

CONTEXT = 160
MAX_NEW = 8
TURNS = ["What is the capital of France?", "And of Germany?", "word " * 200, "/reset", "Name a colour."]
FIGURES = re.compile(r"^\[(\d+) tokens, .*prefilled (\d+) new tokens \((\d+) cached\), .*context (\d+)/(\d+)\]",
                     re.MULTILINE)


@pytest.fixture(scope="module")
def expected(default_checkpoint):
    """Each answer from a fresh cache with the whole conversation prefilled, and the ids the chat should reuse."""
    model = load_model(default_checkpoint, "cpu", torch.float32)
    model.setup_caches(1, CONTEXT)
    tokenizer = load_tokenizer(default_checkpoint.parent)

    def answer(messages):
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
        tokens, _ = generate(model, torch.tensor(ids), MAX_NEW, eos_ids=tokenizer.eos_ids)
        tokens = tokens.tolist()
        return ids, tokens, tokenizer.decode([t for t in tokens if t not in tokenizer.eos_ids])

    first = [{"role": "user", "content": TURNS[0]}]
    ids1, tokens1, text1 = answer(first)
    ids2, _, text2 = answer(first + [{"role": "assistant", "content": text1},
                                     {"role": "user", "content": TURNS[1]}])
    ids3, _, text3 = answer([{"role": "user", "content": TURNS[4]}])
    reused = common_prefix(ids1 + tokens1[:-1], ids2)  # the last answer token never went into the cache
    return dict(texts=[text1, text2, text3], reused=reused, lengths=[len(ids1), len(ids2), len(ids3)])


@pytest.mark.parametrize("flags", [[], ["--self_speculative", "--early_exit", "20", "--speculate_k", "2"]],
                         ids=["plain", "self_speculative"])
def test_chat_through_a_pipe(default_checkpoint, expected, flags):
    result = run_cli("generate.py", "--chat", "--checkpoint_path", default_checkpoint, "--temperature", 0,
                     "--precision", "fp32", "--max_new_tokens", MAX_NEW, "--max_seq_length", CONTEXT, *flags,
                     input="".join(t + "\n" for t in TURNS))
    out = result.stdout
    assert result.returncode == 0 and "Traceback" not in result.stderr, out + result.stderr
    figures = [tuple(map(int, m)) for m in FIGURES.findall(out)]
    assert len(figures) == 3, out  # three answered turns; the overflowing one is refused
    (_, new1, cached1, _, _), (_, new2, cached2, _, _), (_, new3, cached3, _, _) = figures
    length1, length2, length3 = expected["lengths"]
    assert (new1, cached1) == (length1, 0)
    # the second turn prefills only what the cache does not hold: the whole first turn and its answer are reused
    assert cached2 == expected["reused"] and cached2 > length1 and new2 == length2 - cached2
    assert (new3, cached3) == (length3, 0)  # after /reset nothing is reused
    assert "does not fit" in out and "/reset" in out.split("does not fit")[1]
    assert "(conversation cleared)" in out
    for text in expected["texts"]:
        assert text in out, (text, out)
    # the turns come in order: the first answer before the second, the cleared conversation before the third
    positions = [out.index(expected["texts"][0]), out.index(expected["texts"][1]), out.index("does not fit"),
                 out.index("(conversation cleared)"), out.rindex(expected["texts"][2])]
    assert positions == sorted(positions), out
    if flags:
        assert "mean accepted" in out
