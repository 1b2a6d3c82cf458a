"""Tiny random-weight models the project generates itself.

No machine that builds or tests this project can reach a model hub, yet the serving path
must be exercised with real weights, a real tokenizer and the real engine. These
builders write ordinary Hugging Face checkpoints (``config.json``, safetensors,
``tokenizer.json`` with a chat template), and LoRA adapters as PEFT saves them, from a
fixed seed, so every machine generates byte-identical models and tests can compare
outputs across runs.
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


def _train_tokenizer(directory: Path, *, decoder_only: bool = True) -> None:
    """Train and save the byte-level BPE tokenizer every tiny model shares.

    The special tokens differ by architecture the way the real checkpoints' do: a
    decoder-only model (Llama) prepends BOS and has a chat template; an encoder-decoder
    model (T5) has no BOS and appends EOS to the encoder input instead.
    """
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
    if decoder_only:
        marker, single, pair = "<s>", "<s> $A", "<s> $A <s> $B"
    else:
        marker, single, pair = "</s>", "$A </s>", "$A </s> $B </s>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(marker, tokenizer.token_to_id(marker))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>" if decoder_only else None,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE if decoder_only else None,
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


def build_tiny_t5(directory: Path, *, seed: int = 0) -> None:
    """A 2+2-layer T5 v1.1 (d_model 128, 4 heads of 32, gated GELU), like flan-t5 in small.

    T5's conventions are kept: decoding starts from the pad token, EOS ends the encoder
    input, and positions are relative, which is what the transformers engine's batching
    relies on.
    """
    import torch
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    _train_tokenizer(directory, decoder_only=False)
    config = T5Config(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        d_model=128,
        d_kv=32,
        d_ff=256,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=3,
        eos_token_id=1,
        decoder_start_token_id=3,
        # Wider than T5's usual 1.0 so greedy decoding wanders over the vocabulary.
        initializer_factor=5.0,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config).to(torch.float32)
    model.generation_config = GenerationConfig(decoder_start_token_id=3, eos_token_id=1, pad_token_id=3)
    model.save_pretrained(directory, safe_serialization=True)


def build_tiny_llama_lora(directory: Path, base: Path, *, seed: int = 0) -> None:
    """A rank-8 LoRA adapter for the tiny Llama in ``base``, saved as PEFT saves a fine-tune.

    PEFT starts ``lora_B`` at zero so that training begins at the base model, which would
    make an untrained adapter a no-op that no test could tell apart from the base.
    ``init_lora_weights=False`` draws both matrices at random instead, which changes
    greedy output.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    # An adapter depends only on the base's module shapes, not on its weights.
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(base))
    torch.manual_seed(seed)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        init_lora_weights=False,
    )
    adapter = get_peft_model(model, config)
    # For byte-identical files: PEFT keeps target_modules in a set, whose order varies
    # between runs, and the base's local path varies between machines.
    saved = adapter.peft_config["default"]
    saved.target_modules = sorted(saved.target_modules)
    saved.base_model_name_or_path = base.name
    # No embedding layer is adapted; saying so spares PEFT a hub lookup of the base.
    adapter.save_pretrained(directory, save_embedding_layers=False)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-llama": build_tiny_llama,
    "tiny-t5": build_tiny_t5,
}

# LoRA adapters, each made for another builtin: name -> (base, builder(directory, base_dir)).
ADAPTER_BUILDERS: dict[str, tuple[str, Callable[[Path, Path], None]]] = {
    "tiny-llama-lora": ("tiny-llama", build_tiny_llama_lora),
}


def ensure_builtin(name: str, home: Path) -> Path:
    """The directory of builtin model ``name``, generating it on first use.

    Generation happens in a scratch directory that is renamed into place, so two
    processes starting at once never see a half-written checkpoint.
    """
    if name not in BUILDERS and name not in ADAPTER_BUILDERS:
        known = ", ".join(sorted([*BUILDERS, *ADAPTER_BUILDERS]))
        raise KeyError(f"no builtin model named '{name}' (known: {known})")
    target = home / "builtin" / name
    # Only a complete checkpoint is ever renamed into place, so its presence is enough.
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _build(name, scratch, home)
        try:
            os.rename(scratch, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _build(name: str, directory: Path, home: Path) -> None:
    if name in ADAPTER_BUILDERS:
        base, build_adapter = ADAPTER_BUILDERS[name]
        build_adapter(directory, ensure_builtin(base, home))
    else:
        BUILDERS[name](directory)
