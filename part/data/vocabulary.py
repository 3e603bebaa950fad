"""The token set of a corpus' transcripts (what `python -m part frame_vocabulary` writes for the model)."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable

from part.data.samples import read_record
from part.data.shards import expand_shards, iter_tar_samples


def transcript_token_counts(pattern: str, languages: list[str], tokenize: Callable[[str], list[int]],
                            counters: Counter, progress: bool = True) -> Counter:
    """How often each token id occurs in the transcripts of `pattern`'s shards for `languages`, each transcript
    tokenised by `tokenize` as the training stream tokenises it (stripped, no special tokens). Records that are not
    a JSON object with a transcript of their shard's language are counted in `counters`, not read."""
    counts: Counter = Counter()
    for lang in languages:
        urls = expand_shards(pattern, lang)
        clips = 0
        for url in urls:
            for _, members in iter_tar_samples(url, counters):
                read = read_record(members, lang, counters)
                if read is None:
                    continue
                counts.update(tokenize(read[1]))
                clips += 1
        counters["clips"] += clips
        if progress:
            print(f"[frame_vocabulary] {lang}: {clips} transcripts in {len(urls)} shards, {len(counts)} distinct "
                  "tokens so far", file=sys.stderr, flush=True)
    return counts
