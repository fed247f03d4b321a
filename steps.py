"""The model steps generation calls (prefill, one-token decode, early-exit draft, verify) and how they are compiled
and warmed up before anything is timed. generate.py drives them; they hold no generation state."""
import contextlib
import functools
import re
import time
import types
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

import cpu_kernels
import model as model_code
from model import Transformer


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def forward_last(model: Transformer, x: Tensor, input_pos: Tensor, skip_threshold: float = 0.5, *,
                 regional: bool = False, slots: Optional[Tensor] = None) -> Tensor:
    """Full-depth forward; logits of the last row. Prefill and one-token decode. regional, slots: see
    model.run_layers."""
    return model(x, input_pos, skip_threshold, regional=regional, slots=slots)[:, -1]


def draft_step(model: Transformer, x: Tensor, input_pos: Tensor, early_exit: int, *, regional: bool = False,
               slots: Optional[Tensor] = None):
    """Early-exit draft of one token: layers [0, E), then the exit head at E (if trained), the final norm and the
    draft LM head (model.exit_logits). Returns (logits, raw layer-E hidden, which the verify continues from)."""
    h = model.run_layers(model.embed(x), input_pos, 0, early_exit, regional=regional, slots=slots)
    return model.exit_logits(h, early_exit)[:, -1], h


def verify_step(model: Transformer, last_draft: Tensor, last_index: Tensor, kept_hidden: Tensor,
                input_pos: Tensor, early_exit: int, slots: Optional[Tensor] = None):
    """Verify drafts at positions input_pos. Only the last draft (row last_index) still needs layers [0, E): the
    rows before it hold the layer-E inputs the draft steps kept, and their K/V below E are already in the cache.
    Rows after it are padding, so that one compiled shape serves every k; they write K/V past the accepted
    length, which the position mask hides until real tokens overwrite them."""
    h_last = model.run_layers(model.embed(last_draft), input_pos[last_index], 0, early_exit, slots=slots)
    h = kept_hidden.index_copy(1, last_index, h_last)
    return model.head(model.run_layers(h, input_pos, early_exit, model.args.n_layers, slots=slots))[0]


def verify_full(model: Transformer, tokens: Tensor, input_pos: Tensor, slots: Optional[Tensor] = None) -> Tensor:
    return model(tokens, input_pos, slots=slots)[0]


@dataclass
class Steps:
    """The model steps generation calls; compile_steps() gives compiled ones."""
    prefill: Callable = forward_last
    decode: Callable = forward_last
    draft: Callable = draft_step
    verify: Callable = verify_step
    verify_full: Callable = verify_full
    compiled: bool = False
    warm: set = field(default_factory=set)  # the step shapes already compiled (see warm_up)
    bounded: bool = True  # one-token and verify steps read only the cache slots up to their position (live_slots)


def live_slots(model: Transformer, steps: Steps, end: int) -> Optional[Tensor]:
    """The cache slots a one-token or verify step whose last position is end - 1 reads: [0, end), or None (every
    slot) where the steps do not bound attention. Compiled, the count is a dynamic size, so that one graph serves
    every position. Its size hint, by which inductor chooses which loops to run on several threads, is the whole
    cache, whatever position traces the graph."""
    if not steps.bounded:
        return None
    slots = model.slots[:end]
    if steps.compiled:
        torch._dynamo.mark_dynamic(slots, 0, hint_override=model.max_seq_length)
    return slots


# Unfrozen, every weight is an input of the compiled graph, and inductor's wrapper asserted the size and stride of
# each at every call: ~500 asserts a token for an int4 model, 5-8% of its decode (BENCHMARKS.md). Dynamo's guards
# check the same sizes and strides before a graph first runs in a generation loop (steps.checked_once).
UNFROZEN = {"freezing": False, "size_asserts": False}
KERNEL_GROUP_ARGS = 60  # see compile_steps
CACHE_KEY_TAG = f" | flexfast: CPU kernel groups of {KERNEL_GROUP_ARGS} arguments, ended at each layer's end"
COND_NAME = "torch.ops.higher_order.cond"  # torch.cond's name as inductor's unsafe_marked_cacheable_functions has it
LAYER_PATH = re.compile(r"\.layers\.(\d+)(?:\.|$)")  # a module path inside model.layers, as dynamo records it
END_GROUPS_AT_LAYERS = True  # see end_kernel_groups_at_layer_ends; off, inductor groups as it would itself


def own_code(fn: Callable, name: str) -> Callable:
    """fn under a code object of its own. Dynamo keeps compiled graphs per code object, so one step compiled under
    two settings (a benchmark's variants, timed in turn) would otherwise share, and keep replacing, one cache."""
    own = types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name, fn.__defaults__)
    own.__kwdefaults__ = dict(fn.__kwdefaults__ or {})
    return own


def one_token_compile_args(kind: str, frozen_args: dict) -> dict:
    """torch.compile arguments of a CPU one-token step (decode, draft) whose linears are `kind` (ONE_TOKEN_LINEAR).
    The GEMV and the kernel gain nothing from freezing (nothing to prepack), and a frozen graph is one AOTAutograd
    does not cache: unfrozen, a warm start compiles decode in about half the time (BENCHMARKS.md). F.linear keeps
    freezing's prepacked weights (frozen_args). Unfrozen steps drop fp32's max-autotune on purpose: it tunes GEMMs,
    and they have none."""
    return frozen_args if kind == "linear" else dict(fullgraph=True, dynamic=False, options=UNFROZEN)


def before_first_call(prepare: Optional[Callable], step: Callable) -> Callable:
    """step, with prepare() run once before its first call (and so before it is traced); step itself if None."""
    if prepare is None:
        return step
    prepared = False

    def call(*args, **kwargs):
        nonlocal prepared
        if not prepared:
            prepare()
            prepared = True
        return step(*args, **kwargs)
    return call


def compile_one_token(step: Callable, kind: str, frozen_args: dict, regional: bool = False) -> Callable:
    """A CPU one-token step (forward_last, draft_step) compiled as one_token_compile_args says. regional (unfrozen
    steps only): the plain block is traced and compiled once for every layer (model.run_layers), a 4-5x shorter
    first compile that costs decode about 10% in bf16 and int4 (per-layer calls, and dynamo passing every
    weight from Python; BENCHMARKS.md), so it is the user's choice (generate.py --compile_regional). Dynamo reads
    inductor's process-wide freezing flag when it traces (frozen, weights become graph constants, and a region's
    weights must stay inputs), so a regional step runs with that flag off; options= alone reaches inductor only.
    Every step runs in inductor's Python wrapper: its C++ wrapper, which once saved each kernel op call ~1.7 us of
    dispatch, gains nothing since a plain layer is one call (~31 calls a token), and its build cost every cold
    compile 3-4 s and a machine's first run ~15 s (BENCHMARKS.md)."""
    compile_args = one_token_compile_args(kind, frozen_args)
    if compile_args is frozen_args or not regional:
        return torch.compile(step, **compile_args)
    import torch._inductor.config as inductor_config
    # regional=True as the default of a function of its own: a functools.partial is compiled through one wrapper
    # frame that every such step shares, and dynamo then checks guards to tell them apart at every call
    step = own_code(step, f"{step.__name__}_regional")
    step.__kwdefaults__["regional"] = True
    compiled = torch.compile(step, **compile_args)

    def call(*args, **kwargs):
        with inductor_config.patch(freezing=False):
            return compiled(*args, **kwargs)
    return call


def compile_few_rows(step: Callable, frozen_args: dict, to_kernels: Callable) -> Callable:
    """A CPU step of few rows (the verify, a short prefill): frozen where F.linear takes the rows (freezing prepacks
    its weights); unfrozen, as the one-token steps are, for the calls where to_kernels(model, *args, **kwargs) says
    the CPU kernels take them (rows_to_kernels). Each is compiled on its first call only."""
    frozen = torch.compile(step, **frozen_args)
    # a code object of its own: dynamo keeps one cache per code object (own_code)
    unfrozen = torch.compile(own_code(step, f"{step.__name__}_unfrozen"),
                             **one_token_compile_args("kernel", frozen_args))

    def call(model, *args, **kwargs):
        return (unfrozen if to_kernels(model, *args, **kwargs) else frozen)(model, *args, **kwargs)
    return call


def rows_to_kernels(model: Transformer, rows: int) -> bool:
    """Whether a step of `rows` rows (the verify) calls cpu_kernels' ops for its linears: at most MAX_ROWS of them,
    and quantized or of the kind (FEW_ROW_LINEAR, once probed) that the kernel is. Its last draft's rows below the
    exit are one row (ONE_TOKEN_LINEAR's kind), a small share of it."""
    kind = model_code.FEW_ROW_LINEAR.get(str(model.norm.weight.dtype))
    return rows <= cpu_kernels.MAX_ROWS and cpu_kernels.LOADED and ("quantization" in vars(model) or kind == "kernel")


def layer_of(node) -> Optional[int]:
    """The highest model layer any op of an inductor scheduler node comes from, or None (no layer: embedding, head)."""
    layers = [int(m.group(1)) for n in node.get_nodes() for op in (getattr(n.node, "origins", None) or ())
              for path, _ in (op.meta.get("nn_module_stack") or {}).values() if (m := LAYER_PATH.search(path))]
    return max(layers, default=None)


def last_nodes_of_layers(scheduler) -> set:
    """Names of the scheduler's nodes after which the next node with a layer has another layer."""
    ends, next_layer = set(), None
    for node in reversed(scheduler.nodes):
        layer = layer_of(node)
        if layer is not None:
            if next_layer is not None and layer != next_layer:
                ends.add(node.get_name())
            next_layer = layer
    return ends


def end_kernel_groups_at_layer_ends():
    """inductor puts consecutive CPU kernels into one C++ function (up to KERNEL_GROUP_ARGS arguments) and compiles a
    file per function, reusing a file only for identical source. Groups that straddle layers all differ; ending each
    group at a layer's last node makes every middle layer's function the same source: a 30-layer bf16 decode
    compiles 5 C++ files instead of 15 (13 s -> 3.5 s of a 44 s cold compile on 2 cores), and decodes as fast
    (BENCHMARKS.md). The group ends as the argument cap ends it (the scheduler flushes after the node), so inductor
    frees buffers as usual. Installed once per process; graphs without layers are grouped as before."""
    from torch._inductor.codegen.cpp import CppScheduling
    codegen_node = CppScheduling.codegen_node
    if getattr(codegen_node, "ends_at_layers", False):
        return

    def codegen_node_ending_at_layers(self, node):
        codegen_node(self, node)
        if not END_GROUPS_AT_LAYERS:
            return
        scheduler = self.scheduler
        if getattr(scheduler, "flexfast_layer_ends", None) is None:
            scheduler.flexfast_layer_ends = last_nodes_of_layers(scheduler)
        if node.get_name() in scheduler.flexfast_layer_ends:
            self._set_flush_status(True)
    codegen_node_ending_at_layers.ends_at_layers = True
    CppScheduling.codegen_node = codegen_node_ending_at_layers


def compile_steps(device: str, compile_prefill: bool, precision: Optional[torch.dtype] = None,
                  one_token_kind: Optional[str] = None, regional: bool = False, bounded: bool = False) -> Steps:
    """precision: the weights' dtype, when known; on CPU fp32 weights get inductor's own GEMM kernels (below).
    one_token_kind: compile the one-token steps for this kind of linear (model.ONE_TOKEN_LINEAR) instead of the
    machine's choice (benchmarks that time the other kinds). regional: see compile_one_token (CPU only).
    bounded (CPU only; see live_slots): for a cache much longer than the tokens in it, chat's and the server's whole
    context. Attention reads every slot it is given (2,048 slots cost a bf16 decode step 3 ms on 2 cores), and
    bounded, the step reads only the slots up to its position, their count a dynamic size in the graph. A one-shot
    run's cache is sized to the run, so there it saves little, and the dynamic size costs ~0.5 s of a warm compile
    (BENCHMARKS.md). Not on CUDA, where CUDA graphs would record a graph for each length."""
    import torch._inductor.config as inductor_config
    few_rows = None  # what a step of few rows runs once before its first call (CPU: their kernels' probe)
    if device.startswith("cuda"):
        options = dict(mode="reduce-overhead", fullgraph=True, dynamic=False)
        prefill_options = dict(fullgraph=True, dynamic=True)
        one_token = functools.partial(torch.compile, **options)

        def few_row_step(step, to_kernels):
            return torch.compile(step, **options)
    else:
        # On CPU (BENCHMARKS.md): CUDA-graph mode only adds overhead. For the multi-token steps (verify, prefill)
        # freezing lets inductor prepack the weights, and concatenating the linears that share an input (wq/wk/wv,
        # w1/w3) saves 3 of 7 matmul calls per layer.
        # Set process-wide (passed as torch.compile(options=...) these two were measured no faster: dynamo reads
        # freezing when it traces); the per-step exception is compile_one_token, which turns it off around its calls.
        inductor_config.freezing = True
        inductor_config.cpp.enable_concat_linear = True
        # inductor tries each node against up to 64 others that share a buffer; every layer's nodes share the rope
        # row, the mask and the positions, so a cold compile spent ~12 s on pairs 30 layers apart. At 8 the code
        # generated for decode (bf16, int4), the verify and prefill is byte-identical, and compiles 10-25% faster.
        inductor_config.max_fusion_buffer_group_pairwise_attempts = 8
        # A pointwise node that several loops read (a one-token GEMV reads its input once per weight row) is
        # recomputed in each of them unless its expression has more than this many ops (50 by default on CPU): the
        # RMSNorm before wq/wk/wv, w1/w3 and the lm head was recomputed for every weight row, and the head's GEMV took
        # 4.6 ms instead of 2.5 (bf16, 2-core Xeon). At 8 the norm is written once and read back (BENCHMARKS.md).
        inductor_config.realize_cpu_opcount_threshold = 8
        # inductor puts consecutive CPU kernels into one C++ function until it takes 500 arguments: for a 30-layer
        # decode, two functions of 19 and 11 layers. GCC optimizes functions that size worse: at 60 arguments
        # (about one function a layer) the same graph decodes 6-13% faster in bf16 and fp32, and compiles as fast
        # (BENCHMARKS.md). Groups also end at each layer's end (end_kernel_groups_at_layer_ends). A class constant
        # and a method, not config options, in torch 2.13, so inductor's caches are keyed without them: the tag
        # keeps code grouped otherwise (an older cache) from being reused.
        from torch._inductor.codegen.cpp import CppScheduling
        CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM = KERNEL_GROUP_ARGS
        end_kernel_groups_at_layer_ends()
        if CACHE_KEY_TAG not in torch.compiler.config.cache_key_tag:
            torch.compiler.config.cache_key_tag += CACHE_KEY_TAG
        inductor_config.autotune_num_choices_displayed = 0  # no autotune tables on stderr
        inductor_config.max_autotune_report_choices_stats = False
        options = dict(fullgraph=True, dynamic=False)
        prefill_options = dict(fullgraph=True, dynamic=True)
        # max-autotune: inductor's CPP GEMM templates beat MKL's fp32 GEMMs but not oneDNN's bf16 ones, and cost
        # ~2.5x the compile time; so fp32 only, and only when the caller says fp32 (tests don't). One-token linears
        # are a GEMV inductor generates itself or F.linear, whichever cpu_linear's probe found faster on this machine.
        mode = "max-autotune-no-cudagraphs" if precision == torch.float32 else None
        import cpu_linear
        isa_check, *build = cpu_linear.machine_setup()  # started before the model loaded, where the caller did
        isa_check.join()
        cpu_linear.reuse_vector_isa_check()  # the thread's answer (read back), or the user's flag
        cpu_linear.reuse_precompiled_header()
        if precision is not None:  # one-token linears: this machine's faster kernel (a probe cached on disk)
            cpu_linear.choose(precision, mode)
            # the verify's and short prefills' rows: probed only when such a step first runs (8 s on a new machine)
            few_rows = functools.partial(cpu_linear.choose_rows, precision, mode)
        for thread in build:
            thread.join()
        if mode:
            options["mode"] = mode
        kind = one_token_kind or model_code.ONE_TOKEN_LINEAR.get((str(precision), False), "gemv")
        one_token = functools.partial(compile_one_token, kind=kind, frozen_args=options, regional=regional)

        def few_row_step(step, to_kernels):
            return compile_few_rows(step, options, to_kernels)
    # dynamic=False above: the fixed-shape steps get one graph per early exit E and skip threshold, which stay
    # Python constants (automatic dynamic shapes would turn a second E into a symbol the layer slicing cannot take)
    torch._dynamo.config.cache_size_limit = 64
    # inductor's and AOTAutograd's on-disk caches refuse a graph that holds a torch.cond (FlexiDepth's routed
    # layers), so every FlexiDepth run compiled from scratch (about 22 s on 2 cores, against 5-6 s once cached). The
    # cache key hashes each branch's own graph code like the main graph's, so a change in a branch is a new key;
    # marked cacheable, keyed by the torch version (BENCHMARKS.md, measured on CPU; tests/test_steps.py loads it back
    # and compares).
    inductor_config.unsafe_marked_cacheable_functions = {
        **inductor_config.unsafe_marked_cacheable_functions, COND_NAME: torch.__version__}
    # The dynamic prefill took its Python float (skip_threshold) as a symbolic input, which inductor could not turn
    # into a tensor: dynamo traced and AOTAutograd lowered the whole graph, then started over with the float
    # specialized (22 s of an 80 s cold prefill compile on 2 cores; BENCHMARKS.md). Specialized from the start, it
    # is a constant, as in the fixed-shape steps.
    torch._dynamo.config.specialize_float = True
    return Steps(
        prefill=before_first_call(few_rows, torch.compile(forward_last, **prefill_options)) if compile_prefill
        else forward_last,
        decode=one_token(forward_last),
        draft=one_token(draft_step),
        verify=before_first_call(few_rows, few_row_step(
            verify_step, lambda model, last_draft, last_index, kept_hidden, input_pos, *_: rows_to_kernels(
                model, input_pos.numel()))),
        verify_full=before_first_call(few_rows, few_row_step(
            verify_full, lambda model, tokens, *_: rows_to_kernels(model, tokens.shape[1]))),
        compiled=True,
        bounded=bounded and not device.startswith("cuda"),
    )


@torch.no_grad()  # as generate() runs the steps: grad mode is part of what a compiled graph is guarded on
def warm_up(model: Transformer, steps: Steps, prompt_len: int, start_pos: int = 0, speculate_k: int = 0,
            early_exit: Optional[int] = None, draft_model: Optional[Transformer] = None,
            skip_threshold: float = 0.5) -> Optional[float]:
    """Call each compiled step the coming generation will use once, so that compiling is not timed as decoding.
    Returns the seconds spent (compiling on a first run, little once cached), or None when nothing was compiled:
    eager steps, or every step shape already warm. Harmless to the cache: it writes only at positions >= start_pos,
    which prefill and decode overwrite before anything reads them."""
    if not steps.compiled:
        return None
    device = model.norm.weight.device
    t0 = time.perf_counter()
    one = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.tensor([start_pos], device=device)
    todo = []
    # a step shape is warm per model and cache size: the fixed-shape steps recompile for a new cache
    cache, draft_cache = (id(model), model.max_seq_length), (id(draft_model), getattr(draft_model, "max_seq_length", 0))
    if steps.prefill is not forward_last:
        prompt_pos = torch.arange(start_pos, start_pos + prompt_len, device=device)
        prompt = torch.zeros(1, prompt_len, dtype=torch.long, device=device)
        todo.append((("prefill", cache, prompt_len == 1, skip_threshold),
                     lambda: steps.prefill(model, prompt, prompt_pos, skip_threshold)))
    # traced with every slot: a length of 1 (a first position) would be a constant to dynamo
    slots = live_slots(model, steps, model.max_seq_length)
    draft_slots = live_slots(draft_model, steps, draft_model.max_seq_length) if draft_model is not None else None
    if not speculate_k:
        todo.append((("decode", cache, skip_threshold),
                     lambda: steps.decode(model, one, pos, skip_threshold, slots=slots)))
    elif draft_model is None:
        rows = torch.arange(start_pos, start_pos + speculate_k + 1, device=device)
        hidden = torch.zeros(1, speculate_k + 1, model.args.dim, device=device, dtype=model.norm.weight.dtype)
        last = torch.tensor([speculate_k], device=device)
        todo.append((("draft", cache, early_exit), lambda: steps.draft(model, one, pos, early_exit, slots=slots)))
        todo.append((("verify", cache, early_exit, speculate_k),
                     lambda: steps.verify(model, one, last, hidden, rows, early_exit, slots)))
    else:
        rows = torch.arange(start_pos, start_pos + speculate_k + 1, device=device)
        todo.append((("decode", draft_cache, 0.5), lambda: steps.decode(draft_model, one, pos, slots=draft_slots)))
        # contiguous, as the loop's candidates are: an expanded tensor's strides differ, and so would its graph
        todo.append((("verify_full", cache, speculate_k),
                     lambda: steps.verify_full(model, one.repeat(1, speculate_k + 1), rows, slots)))
    cold = [(key, call) for key, call in todo if key not in steps.warm]
    if not cold:
        return None
    for key, call in cold:
        call()
        steps.warm.add(key)
    synchronize(device)
    return time.perf_counter() - t0


def checked_once(steps: Steps):
    """For the rest of a generation loop whose every step has run once with all of dynamo's guards checked: check
    only the guards that tell cached graphs apart. Within one loop the model, its cache and every input's shape
    stay the same (but the live slots' length, a dynamic size in the graph: see live_slots), so the others cannot
    fail; checking them costs ~0.7 ms a token on 2 CPU cores (measured on SmolLM2-135M int4), 10% of a decode step.
    The first, fully checked pass is what makes skipping safe: it compiles this model's graph if the steps had only
    another model's, and a frozen graph holds its model's weights."""
    if not steps.compiled:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
