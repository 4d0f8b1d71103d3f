"""Model layout and loading: families declared as data, the adapters that run them, loaders.

``base`` holds what every adapter shares, ``families`` the language-model families (Llama, OPT,
BLOOM, a generic fallback), ``vision`` the timm families; ``causal_lm`` and ``timm_models`` load
models. Nothing here does quantization math or moves modules between devices.
"""

from .base import QUANTIZABLE, Adapter, AdapterError, BlockInputs, join_name, quantizable_layers
from .causal_lm import ModelLoadError, load_causal_lm, smollm2_gguf
from .families import FAMILIES, BlockAdapter, Family, adapter_for, generic_adapter, register

__all__ = [
    "FAMILIES",
    "QUANTIZABLE",
    "Adapter",
    "AdapterError",
    "BlockAdapter",
    "BlockInputs",
    "Family",
    "ModelLoadError",
    "adapter_for",
    "generic_adapter",
    "join_name",
    "load_causal_lm",
    "quantizable_layers",
    "register",
    "smollm2_gguf",
]
