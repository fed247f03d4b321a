"""Tokenizers, chosen by the files in the checkpoint folder.

tokenizer.json            -> the `tokenizers` package (SmolLM2, most recent repos)
tokenizer.model (protobuf) -> sentencepiece (Llama 2)
tokenizer.model (text)     -> tiktoken, Llama 3's "base64-token rank" lines plus special tokens
Chat prompts are rendered from the checkpoint's own chat_template in jinja2's immutable sandbox, as transformers
does: a template comes with the checkpoint, so it is data and must not reach Python objects or run anything.
"""
import base64
import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Llama 3's pre-tokenizer split pattern (from its tokenizer files; tiktoken needs it spelled out).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL_TOKENS = 256


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def _pick_template(template, source: Path):
    """A template is a string, or (transformers' multi-template form) a list of {name, template}: take "default"."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{source}: chat_template is a {type(template).__name__}, not a template string")
    return template


def _token_text(value):
    # tokenizer_config.json writes special tokens as plain strings or as {"content": ...} objects
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """What every kind shares: special ids from the config files and chat rendering."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.config = _read_json(folder / "tokenizer_config.json")
        template_file = folder / "chat_template.jinja"
        if template_file.exists():
            try:
                self.chat_template = template_file.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{template_file} is not UTF-8 text: {e}") from None
        else:
            self.chat_template = _pick_template(self.config.get("chat_template"), folder / "tokenizer_config.json")

    def _finish_setup(self):
        generation = _read_json(self.folder / "generation_config.json")
        bos, eos = _token_text(self.config.get("bos_token")), _token_text(self.config.get("eos_token"))
        self.bos_token, self.eos_token = bos, eos
        self.bos_id = self.token_to_id(bos) if bos else self.default_bos_id()
        eos_ids = generation.get("eos_token_id", self.token_to_id(eos) if eos else self.default_eos_id())
        self.eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids]) - {None}

    def default_bos_id(self):
        return None

    def default_eos_id(self):
        return None

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError(f"{self.folder} has no chat_template, so --chat cannot format a conversation")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        def tojson(value, indent=None):
            return json.dumps(value, ensure_ascii=False, indent=indent)

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = tojson
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.exceptions.SecurityError as e:
            raise ValueError(f"the checkpoint's chat template tried an unsafe operation and was stopped: {e}") from None
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"the checkpoint's chat template cannot be rendered: {e}") from None
        except ValueError:
            raise  # raise_exception's message, already worded for the user
        except Exception as e:  # a template can fail in plain Python too ({{ 1 + 'a' }}): still the file's fault
            raise ValueError(f"the checkpoint's chat template failed: {type(e).__name__}: {e}") from None


class HFTokenizer(Tokenizer):
    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as RustTokenizer
        super().__init__(folder)
        try:
            self.tok = RustTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:
            raise ValueError(f"cannot read {folder / 'tokenizer.json'}: {e}") from None
        self._finish_setup()

    def token_to_id(self, token):
        return self.tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size()


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, folder: Path, processor):
        super().__init__(folder)
        self.sp = processor
        self._finish_setup()

    def token_to_id(self, token):
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(self.sp.unk_id()) else i

    def default_bos_id(self):
        return self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    def default_eos_id(self):
        return self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        ids = self.sp.encode(text)
        return ([self.bos_id] if add_special_tokens and self.bos_id is not None else []) + ids

    def decode(self, ids: list) -> str:
        return self.sp.decode(ids)

    @property
    def vocab_size(self):
        return self.sp.get_piece_size()


class TiktokenTokenizer(Tokenizer):
    def __init__(self, folder: Path):
        import tiktoken
        super().__init__(folder)
        path = folder / "tokenizer.model"
        not_ranks = f"{path} is neither a sentencepiece model nor a tiktoken ranks file ('base64-token rank' lines)"
        try:
            lines = path.read_text().splitlines()
        except UnicodeDecodeError:
            raise ValueError(not_ranks) from None
        ranks = {}
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
            except ValueError:  # binascii.Error is one too
                raise ValueError(f"{not_ranks}: line {n + 1} is {line[:40]!r}") from None
        special = {}
        for token_id, entry in self.config.get("added_tokens_decoder", {}).items():
            if int(token_id) >= len(ranks):
                special[_token_text(entry)] = int(token_id)
        if not special:  # Llama 3's own reserved block, in its published order
            names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                     "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                     "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
            names += [f"<|reserved_special_token_{i}|>" for i in range(5, LLAMA3_SPECIAL_TOKENS - 5)]
            special = {name: len(ranks) + i for i, name in enumerate(names)}
            self.config.setdefault("bos_token", "<|begin_of_text|>")
            self.config.setdefault("eos_token", "<|end_of_text|>")
        self.special = special
        self.id_to_special = {i: s for s, i in special.items()}
        self.enc = tiktoken.Encoding(name=str(folder), pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=special)
        self._finish_setup()

    def token_to_id(self, token):
        if token in self.special:
            return self.special[token]
        try:
            return self.enc.encode_single_token(token.encode())
        except KeyError:
            return None

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        ids = self.enc.encode(text, allowed_special="all")
        return ([self.bos_id] if add_special_tokens and self.bos_id is not None else []) + ids

    def decode(self, ids: list) -> str:
        return self.enc.decode(ids)

    @property
    def vocab_size(self):
        return self.enc.n_vocab


def load_tokenizer(folder) -> Tokenizer:
    folder = Path(folder)
    if (folder / "tokenizer.json").exists():
        return HFTokenizer(folder)
    model_file = folder / "tokenizer.model"
    if model_file.exists():
        import sentencepiece
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.load(str(model_file))
        except (OSError, RuntimeError):
            return TiktokenTokenizer(folder)  # not a sentencepiece protobuf: Llama 3's ranks file
        return SentencePieceTokenizer(folder, processor)
    raise ValueError(f"no tokenizer in {folder}: expected tokenizer.json or tokenizer.model")


class StreamDecoder:
    """Text of a growing token list, given out piece by piece, each character once: a character whose bytes are split
    across tokens is held back until its last byte arrives. Each push decodes only a short window (the tokens since
    the last piece given out plus the piece before them, so that tokenizers that treat a leading token specially
    decode both windows alike), not the whole output."""

    def __init__(self, tokenizer, skip_ids=()):
        self.tokenizer = tokenizer
        self.skip_ids = set(skip_ids)
        self.ids = []
        self.seen = 0  # tokens of the caller's list taken so far
        self.prefix = 0  # self.ids[prefix:read] decoded to the last piece given out
        self.read = 0

    def push(self, tokens: list) -> str:
        """tokens: every token so far (the list only grows); returns the text that is new and complete."""
        self.ids.extend(t for t in tokens[self.seen:] if t not in self.skip_ids)
        self.seen = len(tokens)
        return self._piece(final=False)

    def flush(self) -> str:
        """What is left at the end, an incomplete character included (as U+FFFD, as a full decode gives it)."""
        return self._piece(final=True)

    def _piece(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        now = self.tokenizer.decode(self.ids[self.prefix:])
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]
