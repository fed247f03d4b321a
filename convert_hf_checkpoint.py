"""Convert a Hugging Face Llama folder (safetensors or .bin, single or sharded) into our checkpoint folder:
model.pth (our state dict) + config.json + tokenizer files.

    python convert_hf_checkpoint.py --checkpoint_dir checkpoints/meta-llama/Llama-3.2-1B
"""
import argparse
import json
import re
from pathlib import Path

import torch
from tqdm import tqdm

from cli import copy_atomic, main_guard, save_atomic, write_atomic, write_text_atomic  # noqa: F401  (save_atomic: scripts import it from here)
from model import ModelArgs, Transformer

TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "chat_template.jinja"]

# HF name (with {} for the layer index) -> our name
WEIGHT_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    # FlexiDepth router and adapter (routed layers only)
    "model.layers.{}.router.router_enc.weight": "layers.{}.router.enc.weight",
    "model.layers.{}.router.router_norm.weight": "layers.{}.router.norm.weight",
    "model.layers.{}.router.router_dec.weight": "layers.{}.router.dec.weight",
    "model.layers.{}.router.router_head.weight": "layers.{}.router.head.weight",
    "model.layers.{}.router_proj.gate_proj.weight": "layers.{}.adapter.gate_proj.weight",
    "model.layers.{}.router_proj.down_proj.weight": "layers.{}.adapter.down_proj.weight",
    "model.layers.{}.router_proj.up_proj.weight": "layers.{}.adapter.up_proj.weight",
    # self-speculation (scripts/train_exit.py; config.json exit_heads / draft_vocab_size): the affine exit head at
    # layer E computes h + proj(h) + bias; draft_vocab holds the token ids of the draft's trimmed LM head (int64)
    "model.exit_heads.{}.proj.weight": "exit_heads.{}.proj.weight",
    "model.exit_heads.{}.bias": "exit_heads.{}.bias",
    "model.draft_vocab": "draft_vocab",
}
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def our_name(hf_name: str):
    m = re.match(r"model\.(layers|exit_heads)\.(\d+)\.(.*)", hf_name)
    if m:
        pattern = f"model.{m.group(1)}.{{}}.{m.group(3)}"
        return WEIGHT_MAP[pattern].format(m.group(2)) if pattern in WEIGHT_MAP else None
    return WEIGHT_MAP.get(hf_name)


def hf_state_dict(state_dict: dict, tie_embeddings: bool) -> dict:
    """Our names -> HF names (WEIGHT_MAP read backwards), contiguous; a tied head is left out as HF leaves it."""
    ours_to_hf = {ours: hf for hf, ours in WEIGHT_MAP.items()}
    out = {}
    for name, t in state_dict.items():
        if tie_embeddings and name == "output.weight":
            continue
        m = re.fullmatch(r"(layers|exit_heads)\.(\d+)\.(.*)", name)
        out[ours_to_hf[f"{m.group(1)}.{{}}.{m.group(3)}"].format(m.group(2)) if m else ours_to_hf[name]] = t.contiguous()
    return out


def weight_files(folder: Path) -> list:
    for index_name, single in [("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")]:
        index = folder / index_name
        if index.exists():
            shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shard_names if not (folder / s).exists()]
            if missing:
                raise FileNotFoundError(f"{index} names shards that are missing: {', '.join(missing)}")
            return [folder / s for s in shard_names]
        if (folder / single).exists():
            return [folder / single]
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if found:
        return found
    raise FileNotFoundError(f"no weights in {folder}: expected model.safetensors(.index.json) or pytorch_model.bin")


def read_weights(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # truncated or corrupt files raise a zoo of types; all mean the same to the user
        raise ValueError(f"cannot read weights from {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON: {e}")


def convert(checkpoint_dir: Path, output_dir: Path = None) -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    output_dir = Path(output_dir or checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder {checkpoint_dir} not found")
    args = ModelArgs.from_folder(checkpoint_dir)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    if args.tie_embeddings:
        expected.pop("output.weight")

    state_dict = {}
    for path in tqdm(weight_files(checkpoint_dir), desc="converting", unit="file"):
        for hf_name, tensor in read_weights(path).items():
            name = our_name(hf_name)
            if name is None:
                if IGNORED.match(hf_name):
                    continue
                raise ValueError(f"{path.name}: unexpected weight {hf_name}")
            if name == "output.weight" and args.tie_embeddings:
                continue
            if name not in expected:
                raise ValueError(f"{path.name}: {hf_name} does not belong to this config "
                                 f"(a router or adapter outside routing_layers, or an exit head or draft vocabulary that "
                                 f"config.json's exit_heads / draft_vocab_size do not declare?)")
            if tuple(tensor.shape) != tuple(expected[name]):
                raise ValueError(f"{hf_name} has shape {tuple(tensor.shape)}, config.json implies "
                                 f"{tuple(expected[name])}")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"{path.name}: {hf_name} holds NaN or Inf values (a corrupt or diverged checkpoint)")
            state_dict[name] = tensor.contiguous()
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise ValueError(f"{len(missing)} weights missing from {checkpoint_dir}, e.g. {missing[0]}")

    output_dir.mkdir(parents=True, exist_ok=True)
    for name in ["config.json"] + TOKENIZER_FILES:
        src = checkpoint_dir / name
        if src.exists() and src.resolve() != (output_dir / name).resolve():
            copy_atomic(src, output_dir / name)
    save_atomic(state_dict, output_dir / "model.pth")
    return output_dir / "model.pth"


# ---------------------------------------------------------------- writing HF-style folders (FlexiDepth)

def write_hf_folder(out_dir: Path, config: dict, hf_weights: dict, tokenizer_from: Path) -> Path:
    """An HF-style folder (config.json, model.safetensors with HF names, the tokenizer files of tokenizer_from),
    every file written whole or not at all; convert() makes its model.pth. Returns the folder."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_from) / name).exists() and Path(tokenizer_from).resolve() != out_dir.resolve():
            copy_atomic(Path(tokenizer_from) / name, out_dir / name)
    write_atomic(out_dir / "model.safetensors",
                 lambda tmp: save_file(hf_weights, str(tmp), metadata={"format": "pt"}))
    write_text_atomic(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return out_dir


def random_router_weights(config: dict, routing_layers: list, seed: int) -> dict:
    """A random FlexiDepth router and adapter per routed layer, HF names (the benchmark's and the tests' stand-in
    for trained ones). The router head is scaled so that the gate's logit spreads around 0: about half the tokens
    skip each routed layer."""
    dim, ffn = config["hidden_size"], config["intermediate_size"]
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) / shape[-1] ** 0.5
    weights = {}
    for i in routing_layers:
        p = f"model.layers.{i}."
        weights[p + "router.router_enc.weight"] = rand(dim // 16, dim)
        weights[p + "router.router_norm.weight"] = 1 + 0.1 * torch.randn(dim // 16, generator=g)
        weights[p + "router.router_dec.weight"] = rand(dim, dim // 16)
        weights[p + "router.router_head.weight"] = 4 * rand(1, dim)
        weights[p + "router_proj.gate_proj.weight"] = rand(ffn // 16, dim)
        weights[p + "router_proj.down_proj.weight"] = rand(ffn // 16, dim)
        weights[p + "router_proj.up_proj.weight"] = rand(dim, ffn // 16)
    return weights


def with_random_routers(source: Path, out_dir: Path, routing_layers: list, seed: int = 0) -> Path:
    """The HF folder source (out_dir may be the same folder) turned FlexiDepth: its weights unchanged plus a random
    router and adapter on each routed layer. Returns out_dir, not yet converted."""
    config = dict(read_config(Path(source)), model_type="ddllama", routing_layers=list(routing_layers))
    weights = {}
    for path in weight_files(Path(source)):
        weights.update(read_weights(path))
    weights.update(random_router_weights(config, routing_layers, seed))
    return write_hf_folder(out_dir, config, weights, source)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert a Hugging Face Llama folder to model.pth")
    parser.add_argument("--checkpoint_dir", type=Path, required=True, help="HF folder (config.json + weights)")
    parser.add_argument("--output_dir", type=Path, default=None, help="where model.pth goes (default: the same)")
    args = parser.parse_args(argv)
    out = main_guard(lambda: convert(args.checkpoint_dir, args.output_dir), "conversion")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
