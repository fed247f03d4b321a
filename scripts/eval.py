"""Evaluate a checkpoint: lm-evaluation-harness tasks, and the per-exit-layer perplexity curve.

    python scripts/eval.py --tasks exit_ppl --max_tokens 8192 --window 512        # the LayerSkip quality curve
    python scripts/eval.py --tasks pydoc_perplexity,humaneval_offline --limit 20
    python scripts/eval.py --tasks humaneval_offline --limit 5 --self_speculative --early_exit 8 --speculate_k 3
    python scripts/eval.py --tasks hellaswag,arc_easy --limit 100                 # lm-eval's own tasks (need the hub)

exit_ppl: each window of pydoc_data.topics runs through the model once; after every layer the shared final norm + LM
head turn the hidden states into next-token losses, so one pass gives the whole curve. The last row is the full model.

Every other name is an lm-eval (0.4.13) task: ours in scripts/eval_tasks/ (offline: humaneval_offline,
pydoc_perplexity), folders given with --include_path, a task YAML's path, or lm-eval's bundled tasks. FlexFastLM answers
lm-eval's requests: loglikelihood with full-depth forwards on the static cache, generate_until through
generate.generate (batch 1; self-speculative with --self_speculative). After lm-eval's table comes ours for generation:
tokens/s, layers per token and mean accepted drafts per step.
"""
import argparse
import json
import logging
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import generate as g  # noqa: E402
from cli import main_guard, write_text_atomic  # noqa: E402
from prompts import pydoc_text  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
EXIT_PPL = "exit_ppl"
HEAD_CHUNK = 1024  # positions per LM-head call when scoring: [T, vocab] logits of a long window would not fit


@torch.no_grad()
def exit_perplexities(model, tokens: torch.Tensor, window: int, batch_size: int = 4):
    """Perplexity of `tokens` [N] when exiting after layer e, for e = 1..L, over non-overlapping windows; and
    {e: perplexity} through the trained exit head at e (full vocabulary) for every exit that has one."""
    L = model.args.n_layers
    heads = {int(e): head for e, head in model.exit_heads.items()}
    nll_head = {e: torch.zeros((), dtype=torch.float64) for e in heads}
    n_windows = (len(tokens) - 1) // window
    if n_windows < 1:
        raise ValueError(f"{len(tokens)} tokens are fewer than one window of {window} + 1")
    inputs = tokens[:n_windows * window].view(n_windows, window)
    targets = tokens[1:n_windows * window + 1].view(n_windows, window)
    nll = torch.zeros(L, dtype=torch.float64)
    input_pos = torch.arange(window, device=tokens.device)
    for start in tqdm(range(0, n_windows, batch_size), desc="windows", file=sys.stderr):
        x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
        fit_cache(model, x.shape[0], window)  # the last batch may be short
        h = model.embed(x)
        for e in range(L):
            h = model.run_layers(h, input_pos, e, e + 1)
            logits = model.head(h).float()
            nll[e] += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").double().cpu()
            if e + 1 in heads:
                logits = model.head(heads[e + 1](h)).float()
                nll_head[e + 1] += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").double().cpu()
    n = n_windows * window
    return [math.exp(v / n) for v in nll.tolist()], {e: math.exp(v.item() / n) for e, v in nll_head.items()}


# ---------------------------------------------------------------- lm-eval model

def fit_cache(model, batch_size: int, length: int):
    """Static caches of exactly batch_size rows and at least length slots. setup_caches keeps any larger cache, but
    the K/V writes need the batch size to match exactly, so a change of batch size forces a fresh allocation."""
    if model.max_batch_size == batch_size and model.max_seq_length >= length:
        return
    model.max_batch_size = -1
    model.setup_caches(batch_size, -(-length // 256) * 256)


class FlexFastLM(TemplateLM):
    """lm-eval's model interface over our Transformer. Tokenization follows lm-eval's own rules (TemplateLM: trailing
    context spaces move to the continuation, an empty context is the prefix token), as its HF backend does."""

    def __init__(self, model, tokenizer, *, batch_size: int = 1, max_length: int = None, steps: g.Steps = None,
                 early_exit: int = None, speculate_k: int = 0, seed: int = 1234):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size
        self._max_length = max_length or model.args.max_position_embeddings
        self.steps = steps or g.Steps()
        self.warmup_pending = steps is not None  # compiled steps: compile before the first timed request
        self.early_exit, self.speculate_k = early_exit, speculate_k
        self.seed = seed  # each sampled request gets the next seed: reruns draw the same tokens
        self.generation_stats = defaultdict(list)  # task name -> [GenerationStats], one per generate_until request

    def next_seed(self) -> int:
        self.seed += 1
        return self.seed

    @property
    def device(self):
        return self.model.norm.weight.device

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token
        return self.tokenizer.token_to_id(eos) if eos else min(self.tokenizer.eos_ids)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.folder).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool = None, **kwargs) -> list:
        if add_special_tokens is None:  # the tokenizer's own default, unless the text already starts with BOS
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: list) -> str:
        return self.tokenizer.decode(tokens)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list:
        """requests: (key, context tokens, continuation tokens). Returns (sum of continuation log-probs, whether the
        continuation is the greedy one). Longest first, in right-padded batches: causal attention never lets a row's
        real positions see its padding."""
        rows = []
        for key, context, continuation in requests:
            inp = (context + continuation)[-(self.max_length + 1):][:-1]
            rows.append((inp, continuation[-len(inp):]))  # a window's tokens past max_length are not scored
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results = [None] * len(rows)
        B = self.batch_size
        for start in tqdm(range(0, len(order), B), desc="loglikelihood", file=sys.stderr, disable=disable_tqdm):
            batch = order[start:start + B]
            T = len(rows[batch[0]][0])
            padded = [rows[i][0] + [0] * (T - len(rows[i][0])) for i in batch]
            padded += [padded[0]] * (B - len(batch))  # the cache has exactly B rows
            fit_cache(self.model, B, T)
            x = torch.tensor(padded, dtype=torch.long, device=self.device)
            h = self.model.run_layers(self.model.embed(x), torch.arange(T, device=self.device), 0,
                                      self.model.args.n_layers)
            for r, i in enumerate(batch):
                inp, continuation = rows[i]
                results[i] = self._score(h[r, len(inp) - len(continuation):len(inp)], continuation)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def _score(self, hidden, targets: list):
        """Sum of log p(target) and whether every target is the argmax, from the hidden states that predict them."""
        targets = torch.tensor(targets, dtype=torch.long, device=hidden.device)
        total, greedy = 0.0, True
        for h, y in zip(hidden.split(HEAD_CHUNK), targets.split(HEAD_CHUNK)):
            logprobs = F.log_softmax(self.model.head(h).float(), dim=-1)
            total += float(logprobs.gather(-1, y[:, None]).sum())
            greedy = greedy and bool((logprobs.argmax(-1) == y).all())
        return total, greedy

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        """Log-likelihood of whole documents, in disjoint windows of max_length tokens (lm-eval's own windowing)."""
        windows, owner = [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        """Batch-1 static-cache decoding through generate.generate, stopping at the first `until` string or after
        max_gen_toks tokens; greedy unless the task asks for sampling."""
        eos_ids = set(self.tokenizer.eos_ids) | {self.eot_token_id}
        eot_text = self.tok_decode([self.eot_token_id])
        jobs = []
        for request in requests:
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            until = [s for s in until if s] + ([eot_text] if eot_text not in until else [])
            max_gen_toks = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            prompt = self.tok_encode(context)[-(self.max_length - max_gen_toks):] or [self.prefix_token_id]
            jobs.append((request, torch.tensor(prompt, dtype=torch.long, device=self.device), until, max_gen_toks))
        if not jobs:
            return []
        # One cache for every request: a compiled decode step would recompile for each new cache size.
        fit_cache(self.model, 1, max(g.cache_length_needed(len(prompt), n, self.speculate_k)
                                     for _, prompt, _, n in jobs))
        if self.warmup_pending:  # compile outside the timed requests (drafts and verify too, when speculating)
            g.generate(self.model, jobs[0][1], min(self.speculate_k + 2, jobs[0][3]), steps=self.steps,
                       early_exit=self.early_exit, speculate_k=self.speculate_k)
            self.warmup_pending = False

        outputs = []
        for request, prompt, until, max_gen_toks in tqdm(jobs, desc="generate_until", file=sys.stderr,
                                                          disable=disable_tqdm):
            gen_kwargs = request.args[1]
            do_sample = bool(gen_kwargs.get("do_sample", False))
            temperature = float(gen_kwargs.get("temperature", 1.0)) if do_sample else 0.0

            def reached_stop_string(tokens):
                text = self.tok_decode([t for t in tokens if t not in eos_ids])
                return any(s in text for s in until)

            tokens, stats = g.generate(
                self.model, prompt, max_gen_toks, g.Sampling(temperature, gen_kwargs.get("top_k"), gen_kwargs.get("top_p"),
                                                             self.next_seed(), str(self.device)), steps=self.steps,
                early_exit=self.early_exit, speculate_k=self.speculate_k, eos_ids=eos_ids,
                callback=reached_stop_string)
            text = self.tok_decode([t for t in tokens.tolist() if t not in eos_ids])
            for s in until:
                text = text.split(s)[0]
            self.generation_stats[request.task_name].append(stats)
            self.cache_hook.add_partial("generate_until", request.args, text)
            outputs.append(text)
        return outputs


def layers_per_token(runs: list, n_layers: int, early_exit: int = None) -> float:
    """FlexiDepth: the layers each generated token ran. Self-speculation: layer passes per decoded token, a step of
    k drafts costing k*E (drafts) + E (the last draft, inside verify) + L - E (verify) = k*E + L for n + 1 tokens.
    Plain decoding: every layer."""
    used = [len(u) for s in runs for u in s.layers_used]
    if used:
        return sum(used) / len(used)
    steps = [(n, k) for s in runs for n, k in zip(s.accepted, s.speculate_k)]
    if steps and early_exit:
        return sum(k * early_exit + n_layers for _, k in steps) / sum(n + 1 for n, _ in steps)
    return float(n_layers)


def generation_summary(lm: FlexFastLM) -> dict:
    """Per generate_until task: requests, tokens, decode tokens/s, layers per token, mean accepted drafts per step."""
    summary = {}
    for task, runs in lm.generation_stats.items():
        decode_tokens = sum(s.new_tokens - 1 for s in runs)
        decode_seconds = sum(s.decode_seconds for s in runs)
        accepted = [n for s in runs for n in s.accepted]
        summary[task] = dict(
            requests=len(runs), tokens=sum(s.new_tokens for s in runs),
            tokens_per_second=decode_tokens / decode_seconds if decode_seconds > 0 else float("nan"),
            layers_per_token=layers_per_token(runs, lm.model.args.n_layers, lm.early_exit),
            mean_accepted=sum(accepted) / len(accepted) if accepted else None)
    return summary


def generation_table(summary: dict, n_layers: int) -> str:
    lines = [f"| generation | requests | tokens | tok/s | layers/token (of {n_layers}) | mean accepted |",
             "|---|---:|---:|---:|---:|---:|"]
    for task, s in summary.items():
        accepted = "-" if s["mean_accepted"] is None else f"{s['mean_accepted']:.3f}"
        lines.append(f"| {task} | {s['requests']} | {s['tokens']} | {s['tokens_per_second']:.2f} | "
                     f"{s['layers_per_token']:.2f} | {accepted} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- tasks

def load_tasks(names: list, include_paths=()):
    """lm-eval's TaskManager and the Task/Group objects for names, with their data loaded. Indexing lm-eval's ~15k
    bundled task configs takes seconds, so our folders are indexed alone first and the full index is built only when
    a name is not there."""
    from lm_eval.tasks import TaskManager
    for path in include_paths:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--include_path {path} is not a folder")
    folders = [str(TASKS_DIR)] + [str(p) for p in include_paths]

    def known(manager, name):
        return name in manager.task_index or (name.endswith((".yaml", ".yml")) and Path(name).is_file())

    manager = TaskManager(include_path=folders, include_defaults=False)
    if not all(known(manager, n) for n in names):
        manager = TaskManager(include_path=folders)
    unknown = [n for n in names if not known(manager, n)]
    if unknown:
        raise ValueError(f"unknown task {', '.join(unknown)}: not in lm-eval's tasks, {TASKS_DIR.name}/ or "
                         f"--include_path (list them with `lm-eval ls tasks`; {EXIT_PPL} is the exit-layer curve)")
    tasks = []
    for name in names:
        try:
            loaded = manager.load([name])
        except Exception as e:  # the hub, datasets and lm-eval raise many kinds here; all mean "no data"
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"task {name} cannot load its data ({type(e).__name__}: {reason}); tasks whose dataset "
                             "is on the Hugging Face Hub need the hub to be reachable") from None
        tasks += [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())
    return manager, tasks


def run_tasks(lm: FlexFastLM, names: list, include_paths=(), limit=None, num_fewshot=None, max_gen_toks=None,
              samples=None, log_samples=False, bootstrap_iters=1000, loaded=None) -> dict:
    """lm-eval's simple_evaluate on our model; returns its results dict."""
    from lm_eval import simple_evaluate
    manager, tasks = loaded or load_tasks(names, include_paths)
    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, samples=samples,
                           num_fewshot=num_fewshot, gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
                           log_samples=log_samples, bootstrap_iters=bootstrap_iters)


# ---------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint_path", type=Path, default=g.DEFAULT_CHECKPOINT)
    p.add_argument("--tasks", default=EXIT_PPL, help=f"comma-separated: {EXIT_PPL} and/or lm-eval task names")
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if below 1)")
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=1, help="loglikelihood rows per forward")
    p.add_argument("--max_length", type=int, default=None,
                   help="context of a scored window (default: the model's max_position_embeddings)")
    p.add_argument("--max_gen_toks", type=int, default=None, help="overrides the tasks' generation length")
    p.add_argument("--include_path", type=Path, action="append", default=[], help="another folder of task YAMLs")
    p.add_argument("--output_path", type=Path, default=None, help="write lm-eval's results as JSON here")
    p.add_argument("--self_speculative", action="store_true", help="generate with LayerSkip self-speculation")
    p.add_argument("--early_exit", type=int, default=None)
    p.add_argument("--speculate_k", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="compile the generation steps")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--verbose", action="store_true", help="show lm-eval's log")
    p.add_argument("--max_tokens", type=int, default=8192, help=f"{EXIT_PPL}: tokens of pydoc_data.topics to score")
    p.add_argument("--window", type=int, default=512, help=f"{EXIT_PPL}: window length")
    p.add_argument("--precision", choices=list(g.PRECISIONS), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def print_exit_perplexities(args, model, tokenizer, device):
    tokens = torch.tensor(tokenizer.encode(pydoc_text())[:args.max_tokens + 1], device=device)
    ppl, ppl_head = exit_perplexities(model, tokens, args.window)
    print(f"\n{args.checkpoint_path.parent.name}, {args.precision}, {len(tokens) - 1} tokens of pydoc_data.topics, "
          f"windows of {args.window}\n")
    if ppl_head:  # a checkpoint with exit heads (scripts/train_exit.py): both curves
        print("| exit after layer | perplexity | x full model | with its exit head | x full model |")
        print("|---|---|---|---|---|")
        for e, v in enumerate(ppl, start=1):
            h = ppl_head.get(e)
            print(f"| {e} | {v:.2f} | {v / ppl[-1]:.2f} | " + (f"{h:.2f} | {h / ppl[-1]:.2f} |" if h else "| |"))
        return
    print("| exit after layer | perplexity | x full model |")
    print("|---|---|---|")
    for e, v in enumerate(ppl, start=1):
        print(f"| {e} | {v:.2f} | {v / ppl[-1]:.2f} |")


def run(args):
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise ValueError("--tasks is empty")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.self_speculative and args.speculate_k < 1:
        raise ValueError(f"--speculate_k must be at least 1, got {args.speculate_k}")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    lm_names = [n for n in names if n != EXIT_PPL]
    loaded = load_tasks(lm_names, args.include_path) if lm_names else None  # bad names fail before the model loads

    device = g.resolve_device(args.device)
    model = g.load_model(args.checkpoint_path, device, g.PRECISIONS[args.precision])
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    L = model.args.n_layers
    if args.self_speculative:
        g.check_early_exit(args.early_exit, L)
        if model.args.routing_layers:
            raise ValueError("self-speculation with a FlexiDepth checkpoint is not supported; drop --self_speculative")
    if EXIT_PPL in names:
        print_exit_perplexities(args, model, tokenizer, device)
    if not lm_names:
        return
    lm = FlexFastLM(model, tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                    steps=g.compile_steps(device, compile_prefill=False) if args.compile else None,
                    early_exit=args.early_exit if args.self_speculative else None,
                    speculate_k=args.speculate_k if args.self_speculative else 0, seed=args.seed)
    results = run_tasks(lm, lm_names, limit=limit, num_fewshot=args.num_fewshot, max_gen_toks=args.max_gen_toks,
                        loaded=loaded)
    from lm_eval.utils import make_table
    print(f"\n{args.checkpoint_path.parent.name}, {args.precision}, {device}"
          + (f", self-speculative E={args.early_exit} k={args.speculate_k}" if args.self_speculative else ""))
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    summary = generation_summary(lm)
    if summary:
        print(generation_table(summary, L))
    if args.output_path:
        write_text_atomic(args.output_path, json.dumps({**results, "generation": summary}, indent=2, default=str))


def main(argv=None):
    args = parse_args(argv)
    if not args.verbose:  # their warnings (hub retries among them) would bury our one-line errors
        for name in ("lm_eval", "datasets", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.ERROR)
    main_guard(lambda: run(args), "evaluation")


if __name__ == "__main__":
    main()
