"""What each engine kind (``engine:`` in the registry) can run, without importing one.

The registry's check, the pool's memory estimate and the engines themselves all need
these facts. Keeping them here, below the engines and free of torch and vLLM, lets
``v4serve check`` and the pool read them without importing an engine (and lets the
layers import only downwards).
"""

from __future__ import annotations

# Transformers engine: the model types it batches exactly as they decode alone.
# Encoder-decoders whose decoder positions are relative, so left-padded rows decode as
# they would alone (server/engines/_seq2seq_batch.py).
RELATIVE_POSITION_MODELS = frozenset({"t5", "mt5", "umt5"})
# Decoder-only models whose every layer caches all keys and values of plain attention,
# checked against ``generate`` in tests/test_transformers_causal.py (_causal_batch.py).
DECODER_ONLY_MODELS = frozenset({"mpt", "llama", "gpt2", "gpt_neox", "bloom", "falcon"})

# vLLM engine on CPU: the KV cache an entry gets when it names no size. vLLM's own
# default (a share of the NUMA node's RAM) refuses to start on small machines.
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30

_SERVED = (
    f"it serves the encoder-decoder model types {', '.join(sorted(RELATIVE_POSITION_MODELS))} "
    f"and the decoder-only model types {', '.join(sorted(DECODER_ONLY_MODELS))}"
)


def model_type_refusal(model_type: str, encoder_decoder: bool) -> str | None:
    """Why the transformers engine cannot serve a checkpoint whose config says this, or None."""
    served = RELATIVE_POSITION_MODELS if encoder_decoder else DECODER_ONLY_MODELS
    if model_type in served:
        return None
    kind = "encoder-decoder" if encoder_decoder else "decoder-only"
    return f"the transformers engine does not serve the {kind} model type '{model_type}': {_SERVED}"


def architecture_refusal(architecture: str) -> str | None:
    """Why the transformers engine cannot serve model class ``architecture`` (a config's
    ``architectures[0]``), or None when it can; decided from the name alone."""
    # transformers' own class-name tables; imported when asked, as it imports torch.
    from transformers.models.auto import modeling_auto

    for encoder_decoder, classes in (
        (True, modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
        (False, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    ):
        for model_type, names in classes.items():
            named = names == architecture or (not isinstance(names, str) and architecture in names)
            if named and model_type_refusal(model_type, encoder_decoder) is None:
                return None
    return f"the transformers engine does not serve '{architecture}': {_SERVED}"
