"""TEMPORARY shim: the target API of issue 13 (Sampling, StreamDecoder, depth_rgb) over today's generate.py.
Deleted when main's restructure lands."""
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

import generate as _g
from generate import depth_rgb  # noqa: F401


@dataclass
class Sampling:
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    generator: torch.Generator = field(default=None, repr=False)

    def __post_init__(self):
        self.generator = torch.Generator()
        self.generator.manual_seed(self.seed if self.seed is not None else torch.seed())


class StreamDecoder:
    def __init__(self, tokenizer):
        self.tokenizer, self.text = tokenizer, ""

    def push(self, ids):
        now = self.tokenizer.decode(ids).rstrip("\ufffd")
        new = now[len(os.path.commonprefix([self.text, now])):]
        self.text = now
        self.full = ids
        return new

    def flush(self):
        now = self.tokenizer.decode(getattr(self, "full", []))
        new = now[len(self.text):]
        self.text = now
        return new


def run_generate(model, prompt, max_new_tokens, sampling, steps=None, early_exit=None, speculate_k=0, eos_ids=(),
                 callback=None):
    return _g.generate(model, prompt, max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                       top_p=sampling.top_p, generator=sampling.generator, steps=steps, early_exit=early_exit,
                       speculate_k=speculate_k, eos_ids=eos_ids, callback=callback)
