"""The Speech LLM: encoder, adapter, LLM (+ LoRA), its parameter groups, its tokenizer, its FLOP count.

Nothing here knows about distribution, the data pipeline or training: the model reads a `Batch` (part/batch.py)
and computes features with part/features.py. Import the submodules (`part.model.speech_llm`, ...); this package
imports nothing by itself.
"""
