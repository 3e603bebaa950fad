"""Streaming data: WebDataset tar shards -> task/language mixture -> duration-bucketed, tokenized batches.

Knows nothing of the model: it needs a tokenizer and the encoder's feature extractor (an `AudioFeatures` of
part/features.py, which it calls without knowing its family), nothing else. Its output, the `Batch`, is defined in
part/batch.py, which the model reads.

  audio.py      decoding, resampling, FLAC encoding
  shards.py     the shard format: writing (builders), reading, shard patterns, index.json
  sources.py    a stage's sources (task x language), their mixture weights, resumable readers
  samples.py    raw members -> task samples (prompt, target, audio bytes)
  batching.py   duration bucketing, the collator, the typed Batch the model reads
  stream.py     the training stream of one stage on one rank, its resume positions
  eval_sets.py  deterministic held-out batches, the same count on every rank
"""
