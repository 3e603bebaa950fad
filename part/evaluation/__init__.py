"""Evaluation: metrics (WER/CER/BLEU, tables), the held-out evaluator run during training, the PART vs baseline
comparison of two finished runs, and the diagnostics: the adapter frames' own reading of a run's held-out clips
(`readout.py`) and Whisper's own reading of a recipe's held-out speech (`reference.py`)."""
