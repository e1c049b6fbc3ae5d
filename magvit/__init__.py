"""magvit: masked generative video transformers and 3D-conv VQ video tokenizers in PyTorch.

Public names are imported lazily so that ``import magvit`` stays cheap and free of side effects.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "config",
    "TokenizerConfig": "tokenizer",
    "VideoTokenizer": "tokenizer",
    "TransformerConfig": "transformer",
    "MaskedVideoTransformer": "transformer",
    "AutoregressiveConfig": "autoregressive",
    "AutoregressiveTransformer": "autoregressive",
    "VideoPipeline": "pipeline",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'magvit' has no attribute '{name}'")
