"""Build the tiny random-weight Llama that the real-vLLM test tier and the fidelity benchmark
serve with the CPU build of vLLM.

The model matches the simulator's built-in ``tiny`` spec (sage_llm.sim.specs): 2 layers,
hidden 128, 2 heads of 64, 2 KV heads, MLP 512, vocabulary 32,000, untied embeddings
(8.716 M parameters), stored in bfloat16. The tokenizer is a byte-level BPE trained in a
second or two on a synthetic corpus generated from the seed, so that its vocabulary is exactly
the model's (every id the random weights can sample detokenizes). A small chat template makes
``/v1/chat/completions`` work.

Everything is derived from ``--seed``: two runs with the same seed write the same files.
Run it with the Python of the vLLM venv (it needs torch, transformers and tokenizers)::

    .cache/real-vllm/venv/bin/python scripts/make_tiny_model.py --out .cache/real-vllm/tiny-llama
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

VOCAB_SIZE = 32000
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_ENGLISH = (
    "the quick brown fox jumps over the lazy dog while a control plane routes requests "
    "to engines that batch prompts, cache prefixes and stream tokens back to clients"
)


def synthetic_corpus(seed: int, words: int = 120_000) -> list[str]:
    """Lines of pseudo-words: varied enough that BPE finds 32k merges, cheap to train on."""
    rng = random.Random(seed)
    syllables = [a + b for a in _LETTERS for b in "aeiouy"] + list(_LETTERS)
    lexicon = [
        "".join(rng.choice(syllables) for _ in range(rng.randint(1, 5))) for _ in range(40_000)
    ]
    english = _ENGLISH.split()
    lines: list[str] = []
    line: list[str] = []
    for _ in range(words):
        line.append(rng.choice(english) if rng.random() < 0.2 else rng.choice(lexicon))
        if rng.random() < 0.1:
            line[-1] += rng.choice(".,;:!?")
        if len(line) >= 16:
            lines.append(" ".join(line))
            line = []
    lines.append(" ".join(line) + " 0123456789")
    return lines


def build_tokenizer(seed: int):  # type: ignore[no-untyped-def]
    """A byte-level BPE with exactly :data:`VOCAB_SIZE` entries (special tokens included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(seed), trainer=trainer)
    size = tok.get_vocab_size()
    if size < VOCAB_SIZE:  # pad so every id the model can sample decodes
        tok.add_tokens([f"<|extra_{i}|>" for i in range(VOCAB_SIZE - size)])
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise SystemExit(f"tokenizer has {tok.get_vocab_size()} entries, expected {VOCAB_SIZE}")
    return tok


def build(out: Path, seed: int) -> None:
    """Write config, bfloat16 weights, tokenizer and generation config into ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(seed)
    eos = tok.token_to_id("<|endoftext|>")
    pad = tok.token_to_id("<|pad|>")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "sage-llm-tiny.json").write_text(
        json.dumps({"seed": seed, "parameters": params, "vocab_size": VOCAB_SIZE}, indent=2) + "\n"
    )
    print(f"tiny llama: {params} parameters, vocabulary {VOCAB_SIZE}, written to {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and tokenizer")
    args = parser.parse_args(argv)
    build(args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
