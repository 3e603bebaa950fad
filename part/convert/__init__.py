"""Building the models a run starts from, outside the Speech LLM itself.

  whisper_ct2.py  a CTranslate2 (faster-whisper) Whisper model -> a transformers Whisper directory (the
                  CTranslate2 format parsed here, without a ctranslate2 dependency)
  whisper_llm.py  Whisper's text decoder -> the demo's stand-in decoder-only LLM that reads the audio slot
  tiny.py         the tiny default encoder, LLM and tokenizer, and the LLM's short text pretraining

The commands are `python -m part convert` and `python -m part tiny` (part/cli/).
"""
