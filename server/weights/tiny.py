"""Tiny random-weight models the project generates itself.

No machine that builds or tests this project can reach a model hub, yet the serving path
must be exercised with real weights, a real tokenizer and the real engine. These
builders write ordinary Hugging Face checkpoints (``config.json``, safetensors,
``tokenizer.json`` with a chat template), and LoRA adapters as PEFT saves them, from a
fixed seed, so every machine generates byte-identical models and tests can compare
outputs across runs.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from server.weights.architectures import ARCHITECTURES, GENERATED, TOKEN_IDS, ArchitectureSpec

TOKENIZER_VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# The tiny LLaVA's image placeholder, a special token its processor expands into the
# image's feature tokens; its template places image parts as the llava-hf templates do.
# (Newlines are printed by expressions: transformers renders with trim_blocks, which
# drops a newline that follows a block tag.)
IMAGE_TOKEN = "<image>"
VISION_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{ message['content'] }}\n",
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{{ '" + IMAGE_TOKEN + "\\n' if part['type'] == 'image' else part['text'] }}"
    "{% endfor %}{% endif %}{{ '\\n' }}",
)
# The tiny LLaVA sees 56x56 images in 14-pixel patches: 16 image tokens each.
VISION_IMAGE_SIZE = 56
VISION_PATCH_SIZE = 14

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


def _tiny_llama_config() -> Any:
    """A 2-layer Llama: hidden 128, 2 heads of 64 (vLLM's CPU attention needs 64), 1 KV head."""
    from transformers import LlamaConfig

    return LlamaConfig(
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


def build_tiny_llama(directory: Path, *, seed: int = 0) -> None:
    """The tiny Llama language model with its own tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    _train_tokenizer(directory)
    config = _tiny_llama_config()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=3)
    model.save_pretrained(directory, safe_serialization=True)


def build_tiny_llava(directory: Path, *, seed: int = 0) -> None:
    """A LLaVA-1.5 in small: a 2-layer CLIP vision tower and a projector on the tiny Llama.

    It is saved with its processor (CLIP image preprocessing plus the tokenizer with an
    ``<image>`` token), which vLLM needs to turn an image into the model's input.
    """
    import torch
    from transformers import (
        CLIPImageProcessor,
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    _train_tokenizer(directory)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = VISION_CHAT_TEMPLATE
    vision = _tiny_clip()
    image_tokens = (VISION_IMAGE_SIZE // VISION_PATCH_SIZE) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=_tiny_llama_config(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=image_tokens,
        vision_feature_select_strategy="default",  # drop CLIP's class token: patches only
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=3)
    model.save_pretrained(directory, safe_serialization=True)
    _classic_llava_keys(directory / "model.safetensors")
    square = {"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": VISION_IMAGE_SIZE}, crop_size=square),
        tokenizer=tokenizer,
        patch_size=VISION_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the class token, which "default" drops again
    )
    processor.save_pretrained(directory)


def _classic_llava_keys(path: Path) -> None:
    """Rename the vision tower's weights to the layout of the llava-hf checkpoints.

    transformers 5 saves them as ``vision_tower.embeddings...``; vLLM 0.32 loads the
    layout of the published checkpoints, ``vision_tower.vision_model.embeddings...``.
    """
    from safetensors.torch import load_file, save_file

    tower, classic = "vision_tower.", "vision_tower.vision_model."
    tensors = load_file(path)
    renamed = {
        classic + key[len(tower) :] if key.startswith(tower) and not key.startswith(classic) else key: value
        for key, value in tensors.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})


def build_tiny_t5(directory: Path, *, seed: int = 0) -> None:
    """A 2+2-layer T5 v1.1 (d_model 128, 4 heads of 32, gated GELU), like flan-t5 in small.

    T5's conventions are kept: decoding starts from the pad token, EOS ends the encoder
    input, and positions are relative, which is what the transformers engine's batching
    relies on.
    """
    from transformers import T5Config, T5ForConditionalGeneration

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
    generation = {"decoder_start_token_id": 3, "eos_token_id": 1, "pad_token_id": 3}
    _save_random(T5ForConditionalGeneration, config, directory, seed, **generation)


def build_tiny_mpt(directory: Path, *, seed: int = 0) -> None:
    """A 2-layer MPT (d_model 128, 2 heads of 64) with the decoder-only tokenizer.

    MPT's conventions are kept: no position embeddings but ALiBi attention biases (up to
    ``max_seq_len`` tokens), no bias terms, and the output layer tied to the embeddings.
    vLLM no longer runs MPT; the transformers engine serves it.
    """
    from transformers import MptConfig, MptForCausalLM

    _train_tokenizer(directory)
    config = MptConfig(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        d_model=128,
        n_heads=2,
        n_layers=2,
        expansion_ratio=4,
        max_seq_len=2048,
        attn_config={"alibi": True, "alibi_bias_max": 8},
        no_bias=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=3,
        # Wider than MPT's usual 0.02 so greedy decoding wanders over the vocabulary.
        initializer_range=0.2,
    )
    _save_random(MptForCausalLM, config, directory, seed, bos_token_id=0, eos_token_id=1, pad_token_id=3)


def _save_random(model_class: Any, config: Any, directory: Path, seed: int, **generation: int) -> None:
    """Draw a model's float32 weights from ``seed`` and save them with its generation config."""
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    model.generation_config = GenerationConfig(**generation)
    model.save_pretrained(directory, safe_serialization=True)


def build_lora(directory: Path, base: Path, *, targets: Sequence[str], seed: int = 0) -> None:
    """A rank-8 LoRA adapter on ``targets`` of the tiny model in ``base``, saved as PEFT
    saves a fine-tune.

    PEFT starts ``lora_B`` at zero so that training begins at the base model, which would
    make an untrained adapter a no-op that no test could tell apart from the base.
    ``init_lora_weights=False`` draws both matrices at random instead, which changes
    greedy output.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    # An adapter depends only on the base's module shapes, not on its weights.
    base_config = AutoConfig.from_pretrained(base)
    base_config.name_or_path = ""  # the base's local path would end up in the adapter's README
    model = AutoModelForCausalLM.from_config(base_config)
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=list(targets), init_lora_weights=False)
    adapter = get_peft_model(model, config)
    # For byte-identical files: PEFT keeps target_modules in a set, whose order varies
    # between runs, and the base's local path varies between machines.
    saved = adapter.peft_config["default"]
    saved.target_modules = sorted(saved.target_modules)
    saved.base_model_name_or_path = base.name
    # No embedding layer is adapted; saying so spares PEFT a hub lookup of the base.
    adapter.save_pretrained(directory, save_embedding_layers=False)


def build_from_spec(spec: ArchitectureSpec, directory: Path, *, seed: int = 0) -> None:
    """The tiny model of one row of ``server.weights.architectures``: its config class with
    the row's settings, random float32 weights from ``seed``, the shared tokenizer (and for
    a vision model, its processor)."""
    _train_tokenizer(directory)
    config = transformers_class(spec.config_class)(**spec.config)
    if spec.vision is not None:
        _VISION_BUILDERS[spec.vision](spec, config, directory, seed)
        return
    _save_random(transformers_class(spec.model_class), config, directory, seed, **TOKEN_IDS)


def _tiny_clip() -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=VISION_IMAGE_SIZE,
        patch_size=VISION_PATCH_SIZE,
        projection_dim=128,
    )


def _vision_tokenizer(directory: Path, tokens: Sequence[str]) -> Any:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)})
    tokenizer.chat_template = VISION_CHAT_TEMPLATE
    return tokenizer


def _build_llava_next(spec: ArchitectureSpec, config: Any, directory: Path, seed: int) -> None:
    """LLaVA-NeXT in small: the tiny CLIP tower (56 px tiles) on a Mistral language model.

    An image is cut into tiles on the best-fitting grid pinpoint, plus one downscaled
    whole; each tile gives 16 feature tokens, and each row of tiles a newline embedding.
    """
    from transformers import LlavaNextConfig, LlavaNextImageProcessor, LlavaNextProcessor

    tokenizer = _vision_tokenizer(directory, [IMAGE_TOKEN])
    side, pinpoints = VISION_IMAGE_SIZE, [[56, 112], [112, 56], [112, 112]]
    config = LlavaNextConfig(
        vision_config=_tiny_clip(),
        text_config=config.text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=pinpoints,
        image_seq_length=(side // VISION_PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    _save_random(transformers_class(spec.model_class), config, directory, seed, **TOKEN_IDS)
    _classic_llava_keys(directory / "model.safetensors")
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}, image_grid_pinpoints=pinpoints
        ),
        tokenizer=tokenizer,
        patch_size=VISION_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(directory)


# Qwen2-VL's own spelling of an image in a prompt, which its processor expands into one
# <|image_pad|> per merged patch.
QWEN2_VL_IMAGE_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
# Its processor resizes images to between these many pixels (multiples of 28 a side): a
# 56x56 image gives 2x2 merged patches, 4 image tokens.
QWEN2_VL_PIXELS = (56 * 56, 112 * 112)


def _build_qwen2_vl(spec: ArchitectureSpec, config: Any, directory: Path, seed: int) -> None:
    """Qwen2-VL in small: its vision tower (14 px patches merged 2x2) and M-RoPE text model."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = _vision_tokenizer(directory, QWEN2_VL_IMAGE_TOKENS)
    start, pad, end, video = (tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_IMAGE_TOKENS)
    config.image_token_id, config.video_token_id = pad, video
    config.vision_start_token_id, config.vision_end_token_id = start, end
    # The added tokens are embedded as text (all but the image pads), so the vocabulary must hold them.
    config.text_config.vocab_size = len(tokenizer)
    config.vision_config.out_hidden_size = config.text_config.hidden_size
    _save_random(transformers_class(spec.model_class), config, directory, seed, **TOKEN_IDS)
    least, most = QWEN2_VL_PIXELS
    size = {"shortest_edge": least, "longest_edge": most}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        video_processor=Qwen2VLVideoProcessor(size=size),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(directory)


def transformers_class(name: str) -> Any:
    """The transformers class called ``name``."""
    import transformers

    return getattr(transformers, name)


_VISION_BUILDERS: dict[str, Callable[[ArchitectureSpec, Any, Path, int], None]] = {
    "llava_next": _build_llava_next,
    "qwen2_vl": _build_qwen2_vl,
}


BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-llama": build_tiny_llama,
    "tiny-t5": build_tiny_t5,
    "tiny-mpt": build_tiny_mpt,
    "tiny-llava": build_tiny_llava,
    # One tiny model per architecture of the shipped registry (server/weights/architectures.py).
    **{spec.builtin: functools.partial(build_from_spec, spec) for spec in GENERATED},
}

# LoRA adapters, each made for another builtin: name -> (base, builder(directory, base_dir)).
ADAPTER_BUILDERS: dict[str, tuple[str, Callable[[Path, Path], None]]] = {
    spec.adapter: (spec.builtin, functools.partial(build_lora, targets=spec.lora_targets))
    for spec in ARCHITECTURES
    if spec.adapter is not None
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
