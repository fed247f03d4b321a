"""tokenizer.py's three kinds against independent readings of the same files: a sentencepiece model trained here
(Llama 2's kind), a tiktoken ranks file written here (Llama 3's kind), and the real SmolLM2 tokenizer.json."""
import base64
import json
import random
import signal

import pytest
import torch

from conftest import DEFAULT_CHECKPOINT
from tokenizer import HFTokenizer, SentencePieceTokenizer, StreamDecoder, TiktokenTokenizer, load_tokenizer

TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "def f(x):\n    return x ** 2  # squares\n\n\nprint(f(12345))",
    "ünïcödé, 日本語 and an emoji 🙂!",
    "it's what we've said; they'll see",
    "tabs\tand  double  spaces  ",
]


# ---------------------------------------------------------------- sentencepiece (Llama 2)

@pytest.fixture(scope="module")
def sentencepiece_folder(tmp_path_factory):
    """A BPE sentencepiece model trained with Llama 2's options on the Python docs, plus Llama 2's config file."""
    import sentencepiece
    from pydoc_data.topics import topics
    folder = tmp_path_factory.mktemp("sentencepiece")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(line for text in topics.values() for line in text.splitlines() if line.strip()))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=500, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2)
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        add_bos_token=True, add_eos_token=False, bos_token="<s>", eos_token="</s>", unk_token="<unk>", legacy=False,
        tokenizer_class="LlamaTokenizer")))
    return folder


def test_sentencepiece_matches_processor(sentencepiece_folder):
    import sentencepiece
    processor = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_folder / "tokenizer.model"))
    tok = load_tokenizer(sentencepiece_folder)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size) == (1, {2}, 500)
    for text in TEXTS + [" leading space", ""]:
        ids = processor.encode(text)
        assert tok.encode(text) == [1] + ids
        assert tok.encode(text, add_special_tokens=False) == ids
        assert tok.decode(tok.encode(text)) == text  # bos is a control piece: decodes to nothing


def test_sentencepiece_matches_transformers(sentencepiece_folder):
    """transformers converts the same file into a `tokenizers` BPE with byte fallback: an independent reading.
    Text with a leading space is left out: transformers (legacy=False) drops that space, sentencepiece keeps it."""
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read a sentencepiece model")
    from transformers import AutoTokenizer
    reference = AutoTokenizer.from_pretrained(sentencepiece_folder)
    tok = load_tokenizer(sentencepiece_folder)
    assert reference.bos_token_id == tok.bos_id and reference.eos_token_id in tok.eos_ids
    for text in TEXTS:
        assert tok.encode(text) == reference.encode(text), text
        ids = tok.encode(text)
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_sentencepiece_defaults_without_config(sentencepiece_folder, tmp_path):
    """No tokenizer_config.json: bos and eos come from the model file itself."""
    (tmp_path / "tokenizer.model").write_bytes((sentencepiece_folder / "tokenizer.model").read_bytes())
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_ids) == (1, {2})
    assert tok.encode("Hello")[0] == 1


# ---------------------------------------------------------------- tiktoken ranks file (Llama 3)

MERGES = [b"th", b"he", b"the", b" t", b" the", b"in", b"ing", b" a", b"an", b"and", b" and", b"er", b"  ", b"    ",
          b"\n\n", b"is", b" is", b"on", b" o", b"of", b" of", b"12", b"123", b"\xc3\xa9"]
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
N_RANKS = 256 + len(MERGES)


@pytest.fixture(scope="module")
def tiktoken_folder(tmp_path_factory):
    """Llama 3's file layout: tokenizer.model with 'base64 rank' lines, specials in tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("tiktoken")
    ranks = [bytes([b]) for b in range(256)] + MERGES
    (folder / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(ranks)))
    added = {str(N_RANKS + i): dict(content=s, lstrip=False, normalized=False, rstrip=False, single_word=False,
                                    special=True) for i, s in enumerate(SPECIAL)}
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        added_tokens_decoder=added, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")))
    (folder / "generation_config.json").write_text(json.dumps(dict(
        bos_token_id=N_RANKS, eos_token_id=[N_RANKS + 1, N_RANKS + 4])))
    return folder


TIKTOKEN_TEXTS = TEXTS + ["the cat and the hat is on the mat", "café",
                          "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]


def test_tiktoken_special_tokens_and_bos(tiktoken_folder):
    tok = load_tokenizer(tiktoken_folder)
    assert isinstance(tok, TiktokenTokenizer)
    assert tok.vocab_size == N_RANKS + len(SPECIAL)
    assert tok.bos_id == N_RANKS
    assert tok.eos_ids == {N_RANKS + 1, N_RANKS + 4}  # generation_config.json's list wins over eos_token
    assert tok.token_to_id("<|eot_id|>") == N_RANKS + 4 and tok.token_to_id("the") == 258
    assert tok.encode("<|eot_id|>", add_special_tokens=False) == [N_RANKS + 4]
    assert tok.encode("the") == [N_RANKS, 258]
    assert tok.encode("the", add_special_tokens=False) == [258]
    assert tok.encode(" the cat", add_special_tokens=False) == [260, 32, 99, 97, 116]


def test_tiktoken_round_trip(tiktoken_folder):
    tok = load_tokenizer(tiktoken_folder)
    for text in TIKTOKEN_TEXTS:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
        assert tok.decode(tok.encode(text)) == "<|begin_of_text|>" + text


def test_tiktoken_matches_tokenizers_reading(tiktoken_folder):
    """transformers' TikTokenConverter turns the ranks file into a `tokenizers` byte-level BPE: an independent
    reading (merges rebuilt from ranks, its own regex engine); AutoTokenizer on the folder goes the same way."""
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter
    converted = TikTokenConverter(vocab_file=str(tiktoken_folder / "tokenizer.model"),
                                  extra_special_tokens=SPECIAL).converted()
    auto = AutoTokenizer.from_pretrained(tiktoken_folder)
    tok = load_tokenizer(tiktoken_folder)
    for text in TIKTOKEN_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == converted.encode(text, add_special_tokens=False).ids, text
        assert ids == auto.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == converted.decode(ids, skip_special_tokens=False)
    assert auto.convert_tokens_to_ids(SPECIAL) == [tok.token_to_id(s) for s in SPECIAL]


def test_tiktoken_without_added_tokens_uses_llama3_block(tiktoken_folder, tmp_path):
    (tmp_path / "tokenizer.model").write_text((tiktoken_folder / "tokenizer.model").read_text())
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == N_RANKS + 256
    assert tok.bos_id == N_RANKS and tok.token_to_id("<|eot_id|>") == N_RANKS + 9
    assert tok.eos_ids == {N_RANKS + 1}


# ---------------------------------------------------------------- tokenizer.json (SmolLM2)

@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer
    folder = DEFAULT_CHECKPOINT.parent
    if not (folder / "tokenizer.json").exists():
        pytest.fail(f"{folder / 'tokenizer.json'} is missing: run ./scripts/prepare.sh first")
    return load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)


def test_tokenizer_json_encode_matches_transformers(smollm2):
    tok, reference = smollm2
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_ids == {reference.convert_tokens_to_ids("<|im_end|>")} == {2}
    for text in TEXTS + [" leading space", "<|im_start|>user\nhi<|im_end|>\n"]:
        for special in (True, False):
            assert tok.encode(text, add_special_tokens=special) == reference.encode(
                text, add_special_tokens=special), text
        ids = tok.encode(text)
        assert tok.decode(ids) == reference.decode(ids) == text


CONVERSATIONS = {
    "single": [dict(role="user", content="What is the capital of France?")],
    "system": [dict(role="system", content="You answer in one word."),
               dict(role="user", content="What is the capital of France?")],
    "multi_turn": [dict(role="user", content="Hi!"), dict(role="assistant", content="Hello! How can I help?"),
                   dict(role="user", content="Name a prime.\nJust one.")],
    "multi_turn_system": [dict(role="system", content="Be brief."), dict(role="user", content="Hi!"),
                          dict(role="assistant", content="Hello."), dict(role="user", content="Bye.")],
}


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_chat_template_matches_transformers(smollm2, conversation):
    tok, reference = smollm2
    messages = CONVERSATIONS[conversation]
    for generation_prompt in (True, False):
        ours = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)
        assert ours == reference.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=generation_prompt)
    assert ours.count("<|im_start|>") == len(messages) + (conversation in ("single", "multi_turn"))


def test_no_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    for garbage in (b"\x80\x81 not utf-8", b"IQ== 0\nnot-base64! 1\n", b"IQ== zero\n", b"just some text\n"):
        (tmp_path / "tokenizer.model").write_bytes(garbage)
        with pytest.raises(ValueError, match="neither a sentencepiece model nor a tiktoken ranks file"):
            load_tokenizer(tmp_path)


# ---------------------------------------------------------------- streaming (real SmolLM2 tokenizer)

MULTI_BYTE = "日本語のテキスト, café naïve Ünïcödé, emoji 🙂🎉👍🏽 and 中文字符 — «ok» 😀"
SHORT_MULTI_BYTE = "中文 café 🙂👍🏽"  # through the real model: every token is a forward, keep it short


def streamed(tokenizer, ids, skip_ids=()):
    """What a stream of ids prints, pushed one token at a time as generation does."""
    stream = StreamDecoder(tokenizer, skip_ids)
    return "".join(stream.push(ids[:i + 1]) for i in range(len(ids))) + stream.flush()


def test_stream_decoder_never_splits_a_character(smollm2):
    tok, _ = smollm2
    ids = tok.encode(MULTI_BYTE, add_special_tokens=False)
    assert sum("\ufffd" in tok.decode([i]) for i in ids) > 10  # many characters really are split across tokens
    assert streamed(tok, ids) == tok.decode(ids) == MULTI_BYTE
    # random ids, half of them byte fragments: invalid UTF-8 included, the stream still equals the full decode
    fragments = [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]
    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.choice(fragments) if rng.random() < 0.5 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randrange(1, 24))]
        assert streamed(tok, ids) == tok.decode(ids), ids


def test_generate_streams_multi_byte_text_to_stdout(default_checkpoint, capsys, monkeypatch):
    """generate.py's own printer on the real model: the tokens are scripted (the sampler returns them in turn), the
    text printed between the summary line and the figures is their decode, exactly."""
    import generate
    from sampling import Sampling
    tok = load_tokenizer(default_checkpoint.parent)
    ids = tok.encode(SHORT_MULTI_BYTE, add_special_tokens=False)
    assert sum("\ufffd" in tok.decode([i]) for i in ids) >= 3
    script = iter(ids)
    monkeypatch.setattr(Sampling, "sample", lambda self, logits: torch.tensor([next(script)]))
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    generate.main(["--checkpoint_path", str(default_checkpoint), "--device", "cpu", "--precision", "fp32",
                   "--prompt", "Hi", "--max_new_tokens", str(len(ids)), "--ignore_eos"])
    out = capsys.readouterr().out
    summary, blank, rest = out.split("\n", 2)
    assert "layers, dim" in summary and blank == ""
    assert rest.split("\n\nprompt ")[0] == SHORT_MULTI_BYTE
