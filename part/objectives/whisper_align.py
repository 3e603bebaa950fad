"""Token timings from a Whisper model's alignment heads (forced alignment of a known transcript).

Whisper's decoder, teacher-forced on the transcript, attends from each text token to the encoder frames that
hold it; a few of its cross-attention heads (the checkpoint's `generation_config.alignment_heads`) do so sharply.
Their weights, normalised per frame and smoothed over time, give a token-by-frame score; the monotonic path of
highest total score (dynamic time warping) assigns every token a span of 20 ms frames.

The timings serve as per-frame targets for the adapter (part/objectives/frames.py), the supervision an adapter-only
stage otherwise has to find by itself; for an LLM with another tokenizer, its tokens take the spans of the characters
they cover (`map_timings`). `python -m part align` prints the timings of one clip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import median_filter

SECONDS_PER_FRAME = 0.02  # Whisper's encoder: 100 mel frames/s, halved by its second convolution
WINDOW_SECONDS = 30.0  # Whisper's input window


@dataclass(frozen=True)
class TokenTiming:
    token_id: int
    text: str
    start: float  # seconds
    end: float


def dtw_path(cost: np.ndarray) -> list[tuple[int, int]]:
    """The monotonic path from (0, 0) to (n-1, m-1) through `cost` [n, m] with the least total cost; each move
    is one step right, down, or diagonal. One vectorised pass per row: with S the row's running sum of cost,
    D[i, j] = S[j] + min over k <= j of (A[k] - S[k]), where A[k] enters cell k from the row above."""
    n, m = cost.shape
    if n == 0 or m == 0:
        raise ValueError(f"dtw_path: empty cost matrix {cost.shape}")
    cost = cost.astype(np.float64)
    total = np.empty((n, m))
    from_left = np.zeros((n, m), dtype=bool)  # reached from (i, j-1)
    from_diag = np.zeros((n, m), dtype=bool)  # else from (i-1, j-1) when True, from (i-1, j) when False
    running = np.cumsum(cost[0])
    total[0] = running
    from_left[0, 1:] = True
    for i in range(1, n):
        above = total[i - 1]
        diag = np.concatenate([[np.inf], above[:-1]])
        from_diag[i] = diag < above
        enter = cost[i] + np.minimum(diag, above)
        running = np.cumsum(cost[i])
        entry = enter - running
        best_entry = np.minimum.accumulate(entry)
        total[i] = running + best_entry
        # From the left where a cell further left is the better entry (compared as stored: exact, no rounding).
        from_left[i] = entry > best_entry
    path, i, j = [], n - 1, m - 1
    while True:
        path.append((i, j))
        if i == 0 and j == 0:
            break
        if from_left[i, j]:
            j -= 1
        elif from_diag[i, j]:
            i, j = i - 1, j - 1
        else:
            i -= 1
    return path[::-1]


def _centre_owners(timings: list[TokenTiming], frames: int, seconds_per_frame: float) -> list[int]:
    """For each frame, the index of the token placed there (-1: none): each token at the frame holding its span's
    centre, moved to the next free frame when two share one, dropped when none is left."""
    owners = [-1] * frames
    for i, t in enumerate(timings):
        j = min(int((t.start + t.end) / 2 / seconds_per_frame), frames - 1)
        while j < frames and owners[j] != -1:
            j += 1
        if j < frames:
            owners[j] = i
    return owners


def frame_targets(timings: list[TokenTiming], frames: int, seconds_per_frame: float, blank: int) -> list[int]:
    """One target per frame of `seconds_per_frame`: each token at the frame holding its span's centre (moved to
    the next free frame when two share one; dropped when none is left), `blank` elsewhere, as a CTC-trained
    model emits a transcript."""
    return [timings[i].token_id if i >= 0 else blank for i in _centre_owners(timings, frames, seconds_per_frame)]


def frame_owners(timings: list[TokenTiming], frames: int, seconds_per_frame: float) -> list[int]:
    """For each frame, the index (into `timings`) of the token that owns it, -1 where none does. A token first
    gets the frame `frame_targets` gives it (its span's centre), then every still free frame whose centre lies in
    its span: the frames where a CTC-style model may emit it. A token `frame_targets` drops owns no frame."""
    owners = _centre_owners(timings, frames, seconds_per_frame)
    anchored = set(owners) - {-1}
    for i, t in enumerate(timings):
        if i not in anchored:
            continue
        for f in range(int(t.start / seconds_per_frame), frames):
            centre = (f + 0.5) * seconds_per_frame
            if centre >= t.end:
                break
            if centre >= t.start and owners[f] == -1:
                owners[f] = i
    return owners


def read_alignment_heads(whisper_dir: str | Path) -> list[tuple[int, int]]:
    """The (layer, head) pairs of the checkpoint's `generation_config.alignment_heads`; a ValueError naming the
    file when it cannot be read or lists none."""
    generation = Path(whisper_dir) / "generation_config.json"
    try:
        heads = json.loads(generation.read_text()).get("alignment_heads")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{generation}: cannot read the alignment heads ({exc})") from exc
    if not heads:
        raise ValueError(f"{generation}: no alignment_heads (a Whisper checkpoint lists them there)")
    return [(int(layer), int(head)) for layer, head in heads]


class WhisperAligner:
    """Forced alignment with a transformers Whisper directory (its encoder, decoder, tokenizer and alignment
    heads); the transcript and its language are known."""

    def __init__(self, whisper_dir: str | Path, device: str | torch.device = "cpu"):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.heads = read_alignment_heads(whisper_dir)
        self.device = torch.device(device)
        # eager: sdpa does not return attention weights
        self.model = WhisperForConditionalGeneration.from_pretrained(whisper_dir, attn_implementation="eager")
        self.model.to(self.device).eval()
        self.processor = WhisperProcessor.from_pretrained(whisper_dir)
        self.filter_width = int(getattr(self.model.config, "median_filter_width", 7) or 7)
        tokenizer = self.processor.tokenizer
        self.prefix_ids = {name: tokenizer.convert_tokens_to_ids(name)
                           for name in ("<|startoftranscript|>", "<|transcribe|>", "<|notimestamps|>")}

    def language_id(self, language: str) -> int:
        tokenizer = self.processor.tokenizer
        token = f"<|{language}|>"
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"language {language!r}: this Whisper tokenizer has no {token} token")
        return token_id

    def task_prefix(self, language: str) -> list[int]:
        """The decoder's prompt before the text: start of transcript, language, transcribe, no timestamps."""
        return [self.prefix_ids["<|startoftranscript|>"], self.language_id(language),
                self.prefix_ids["<|transcribe|>"], self.prefix_ids["<|notimestamps|>"]]

    @torch.no_grad()
    def align(self, audio: np.ndarray, text: str, language: str, sampling_rate: int = 16000) -> list[TokenTiming]:
        """Timings of `text`'s tokens (Whisper's tokenizer, no special tokens) in `audio` (mono, at most 30 s)."""
        seconds = len(audio) / sampling_rate
        if seconds > WINDOW_SECONDS:
            raise ValueError(f"align: {seconds:.1f} s of audio; Whisper's window is {WINDOW_SECONDS:.0f} s")
        tokenizer = self.processor.tokenizer
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            return []
        prefix = self.task_prefix(language)
        features = self.processor.feature_extractor(audio, sampling_rate=sampling_rate,
                                                    return_tensors="pt").input_features.to(self.device)
        out = self.model(input_features=features, decoder_input_ids=torch.tensor([prefix + ids], device=self.device),
                         output_attentions=True)
        frames = max(1, min(int(np.ceil(seconds / SECONDS_PER_FRAME)), out.cross_attentions[0].shape[-1]))
        return self._timings(out.cross_attentions, ids, len(prefix), frames)

    @torch.no_grad()
    def align_encoded(self, states: torch.Tensor, ids: list[int], language: str) -> list[TokenTiming]:
        """Timings of the text tokens `ids` (this Whisper's vocabulary) in a clip already encoded by a Whisper
        encoder: `states` [frames, width], the clip's own frames only (no padding to 30 s). What the in-step
        frame targets use: the encoder's outputs exist there already."""
        if not ids:
            return []
        prefix = self.task_prefix(language)
        decoder = self.model.get_decoder()
        states = states.to(self.device, self.model.dtype)[None]
        out = decoder(input_ids=torch.tensor([prefix + list(ids)], device=self.device), encoder_hidden_states=states,
                      output_attentions=True, use_cache=False)
        return self._timings(out.cross_attentions, list(ids), len(prefix), states.shape[1])

    def _timings(self, cross_attentions: tuple[torch.Tensor, ...], ids: list[int], prefix_length: int,
                 frames: int) -> list[TokenTiming]:
        """The alignment heads' weights over the first `frames` frames -> each token's span (DTW)."""
        # Row k: the attention while predicting text token k (its input is the token before it).
        weights = torch.stack([cross_attentions[layer][0, head] for layer, head in self.heads])
        weights = weights[:, prefix_length - 1 : prefix_length - 1 + len(ids), :frames].float()
        weights = (weights - weights.mean(-2, keepdim=True)) / weights.std(-2, keepdim=True, unbiased=False).clamp(
            min=1e-6)
        weights = weights.cpu().numpy()
        if weights.shape[-1] > self.filter_width // 2:  # a clip of a few frames is left as it is
            # over time, each frame's window mirrored at the clip's ends
            weights = median_filter(weights, size=(1, 1, self.filter_width), mode="mirror")
        spans: dict[int, list[int]] = {}
        for token, frame in dtw_path(-weights.mean(0)):
            spans.setdefault(token, []).append(frame)
        tokenizer = self.processor.tokenizer
        return [TokenTiming(token_id=t, text=tokenizer.decode([t]), start=min(spans[k]) * SECONDS_PER_FRAME,
                            end=(max(spans[k]) + 1) * SECONDS_PER_FRAME) for k, t in enumerate(ids)]


def alignment_heads_problem(whisper_dir: str | Path) -> str | None:
    """Why `whisper_dir` cannot give token timings (None: it can): a Whisper directory with its decoder's weights
    and `generation_config.alignment_heads`."""
    whisper_dir = Path(whisper_dir)
    try:
        model_type = json.loads((whisper_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        return f"a readable {whisper_dir / 'config.json'} ({exc})"
    if model_type != "whisper":
        return f"a Whisper directory ({whisper_dir} holds a {model_type!r} model)"
    try:
        read_alignment_heads(whisper_dir)
    except ValueError as exc:
        return f"readable alignment heads ({exc})"
    weights = whisper_dir / "model.safetensors"
    if not weights.is_file():
        return f"the decoder's weights in {weights} (no such file)"
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as fh:
        if not any(".decoder." in key or key.startswith("decoder.") for key in fh.keys()):
            return f"the decoder's weights in {weights} (it holds the encoder only)"
    return None


def token_char_spans(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text `ids` decode to and each token's [start, end) characters in it, by decoding growing prefixes (any
    tokenizer, slow or fast). A token that ends inside a character (byte fallback) shares that character's span
    with the tokens that complete it."""
    spans, pending, done = [], 0, ""
    for k in range(len(ids)):
        text = tokenizer.decode(ids[: k + 1], skip_special_tokens=True)
        if text.endswith("\ufffd") and k + 1 < len(ids):  # an incomplete character: wait for the next token
            pending += 1
            continue
        start = min(len(done), len(text))
        spans.extend([(start, len(text))] * (pending + 1))
        pending, done = 0, text
    return done, spans


def _strip(text: str, span: tuple[int, int]) -> tuple[int, int]:
    """`span` without its leading and trailing whitespace (an empty span where it holds nothing else)."""
    start, end = span
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def map_timings(timings: list[TokenTiming], teacher_spans: list[tuple[int, int]], ids: list[int],
                spans: list[tuple[int, int]], text: str, names: list[str]) -> list[TokenTiming]:
    """Timings of other tokens of the same `text`: token k (`ids[k]`, characters `spans[k]`) spans the time of the
    teacher tokens whose characters (`teacher_spans`, parallel to `timings`) overlap its own, whitespace aside.
    Tokens that overlap none (whitespace alone, or past the teacher's cut) get no timing."""
    teacher = [_strip(text, span) for span in teacher_spans]
    out = []
    for token, span, name in zip(ids, spans, names):
        start, end = _strip(text, span)
        covered = [t for t, (a, b) in zip(timings, teacher) if a < end and start < b]
        if start < end and covered:
            out.append(TokenTiming(token_id=token, text=name, start=min(t.start for t in covered),
                                   end=max(t.end for t in covered)))
    return out


# Text on which an LLM tokenizer that shares Whisper's vocabulary splits exactly as Whisper's does: its transcripts'
# token ids are then the teacher's own, and the timings need no mapping.
VOCABULARY_PROBE = "Hello world, wie geht's? ¿Qué tal, señor? 你好，世界。 Привет, мир! 1,234.5%"


class FrameTargetTeacher:
    """Token timings for the adapter's frame loss, from the Whisper checkpoint the encoder came from: its decoder's
    alignment heads over the encoder's outputs of the step. The transcripts come as the LLM's token ids; with an
    LLM tokenizer that splits text as Whisper's does, those are the teacher's tokens, else the teacher aligns the
    decoded text with its own tokens and the timings are mapped onto the LLM's through character spans."""

    def __init__(self, whisper_dir: str | Path, llm_tokenizer):
        self.aligner = WhisperAligner(whisper_dir)
        self.llm_tokenizer = llm_tokenizer
        whisper_tokenizer = self.aligner.processor.tokenizer
        mine = whisper_tokenizer(VOCABULARY_PROBE, add_special_tokens=False)["input_ids"]
        theirs = llm_tokenizer(VOCABULARY_PROBE, add_special_tokens=False)["input_ids"]
        self.shared_vocabulary = mine == theirs
        # Whisper's text tokens come before its first special token; special tokens have no timing.
        self.text_vocab = whisper_tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.max_tokens = self.aligner.model.config.max_target_positions - 4  # the 4-token task prefix

    def timings(self, states: torch.Tensor, state_lengths: list[int], transcripts: list[list[int]],
                languages: list[str]) -> list[list[TokenTiming]]:
        """For each clip i (encoder outputs `states[i, :state_lengths[i]]`, transcript as the LLM's token ids,
        language): the timings of its tokens (special tokens have none and are left out; past the decoder's
        length, cut)."""
        if states.device != self.aligner.device:  # the teacher runs where the step runs (once moved, it stays)
            self.aligner.model.to(states.device)
            self.aligner.device = states.device
        out = []
        for i, (ids, language) in enumerate(zip(transcripts, languages)):
            clip = states[i, : state_lengths[i]].detach()
            if self.shared_vocabulary:
                ids = [t for t in ids if t < self.text_vocab][: self.max_tokens]
                out.append(self.aligner.align_encoded(clip, ids, language))
                continue
            special = set(self.llm_tokenizer.all_special_ids)
            ids = [t for t in ids if t not in special]
            text, spans = token_char_spans(self.llm_tokenizer, ids)
            encoding = self.aligner.processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            teacher_ids = encoding["input_ids"][: self.max_tokens]
            timed = self.aligner.align_encoded(clip, teacher_ids, language)
            names = [self.llm_tokenizer.decode([t]) for t in ids]
            out.append(map_timings(timed, encoding["offset_mapping"][: len(teacher_ids)], ids, spans, text, names))
        return out
