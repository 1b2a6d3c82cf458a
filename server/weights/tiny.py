"""Tiny random-weight models the project generates itself.

No machine that builds or tests this project can reach a model hub, yet the serving path
must be exercised with real weights, a real tokenizer and the real engine. These
builders write ordinary Hugging Face checkpoints (``config.json``, safetensors,
``tokenizer.json`` with a chat template) from a fixed seed, so every machine generates
byte-identical models and tests can compare outputs across runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

TOKENIZER_VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# A small, varied corpus: the tokenizer only needs to learn plausible merges.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with
a single step. To be, or not to be, that is the question. All that glitters is not gold.
Serving large language models on your own GPUs: registries, engines, streaming tokens,
stop sequences, temperature, nucleus sampling, prompts and completions. def main():
    return sum(x * x for x in range(10))  # numbers 0123456789 and symbols {}[]()<>=+-*/
Once upon a time there was a model that answered every question with another question.
Le renard brun saute par-dessus le chien paresseux. Der schnelle braune Fuchs springt.
""".strip()


def _train_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = _CORPUS.splitlines()
    tokenizer.train_from_iterator((line for _ in range(20) for line in lines), trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )
    wrapped.save_pretrained(directory)


def build_tiny_llama(directory: Path, *, seed: int = 0) -> None:
    """A 2-layer Llama (hidden 128, 2 heads of 64, 1 KV head) with its own tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    _train_tokenizer(directory)
    config = LlamaConfig(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=3,
        tie_word_embeddings=False,
        # Wider than the usual 0.02 so greedy decoding wanders over the vocabulary
        # instead of repeating one token, which makes stop-sequence tests meaningful.
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=3)
    model.save_pretrained(directory, safe_serialization=True)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-llama": build_tiny_llama,
}


def ensure_builtin(name: str, home: Path) -> Path:
    """The directory of builtin model ``name``, generating it on first use.

    Generation happens in a scratch directory that is renamed into place, so two
    processes starting at once never see a half-written checkpoint.
    """
    builder = BUILDERS.get(name)
    if builder is None:
        raise KeyError(f"no builtin model named '{name}' (known: {', '.join(sorted(BUILDERS))})")
    target = home / "builtin" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        builder(scratch)
        try:
            os.rename(scratch, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
