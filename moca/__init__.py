"""MoCa: a packed, bidirectional Qwen2.5-VL that turns texts, images and interleaved
inputs into L2-normalised embeddings.

    from moca import load_model, Processor
    model = load_model("tiny")                 # or "3b", "7b", or an HF checkpoint dir
    proc = Processor.from_pretrained("tiny")
    emb = model.embed(proc([{"text": "a cat"}]))

Names resolve lazily so that `import moca.host_ops` stays light.
"""

_EXPORTS = {
    "load_model": "moca.checkpoint",
    "save_model": "moca.checkpoint",
    "Processor": "moca.processor",
    "PackedBatch": "moca.batch",
    "ModelConfig": "moca.config",
    "MoCaModel": "moca.model",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moca' has no attribute {name!r}")
