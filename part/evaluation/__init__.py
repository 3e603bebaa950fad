"""Evaluation: metrics (WER/CER/BLEU, tables), the held-out evaluator run during training, and the PART vs
baseline comparison of two finished runs."""
