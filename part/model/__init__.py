"""The Speech LLM: encoder, adapter, LLM (+ LoRA), its parameter groups, its tokenizer, its FLOP count.

Nothing here knows about distribution. Import the submodules (`part.model.speech_llm`, `part.model.groups`, ...);
this package imports nothing, so the config validator can ask `part.model.groups` without loading torch.
"""
