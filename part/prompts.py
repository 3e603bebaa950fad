"""Task prompts. A sample becomes (prompt text with one audio placeholder or none, target text)."""

from __future__ import annotations

AUDIO_TOKEN = "<|audio|>"
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"

LANGUAGE_NAMES = {
    "en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
    "ru": "Russian", "zh": "Chinese", "ja": "Japanese", "ko": "Korean", "nl": "Dutch", "pl": "Polish",
    "tr": "Turkish", "ar": "Arabic", "hi": "Hindi", "vi": "Vietnamese", "uk": "Ukrainian", "yue": "Cantonese",
    "th": "Thai", "sv": "Swedish",
}


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)


def instruction(task: str, source: str, target: str | None = None, text: str | None = None) -> str:
    """The user turn for `task`; speech tasks carry the audio placeholder, text tasks carry the source text."""
    if task == "asr":
        body = f"{AUDIO_TOKEN}\nTranscribe the {language_name(source)} audio."
    elif task == "s2tt":
        body = f"{AUDIO_TOKEN}\nTranslate the {language_name(source)} audio into {language_name(target)}."
    elif task == "mt":
        body = f"Translate this {language_name(source)} text into {language_name(target)}:\n{text}"
    elif task == "text":
        body = f"Continue this {language_name(source)} text:\n{text}"
    else:
        raise ValueError(f"unknown task '{task}'")
    return f"{TURN_START}user\n{body}{TURN_END}\n{TURN_START}assistant\n"


def split_for_text_task(text: str) -> tuple[str, str]:
    """For the `text` (continuation) task: the first half of the words is the prompt, the rest the target."""
    words = text.split()
    if len(words) < 2:  # scripts without spaces: split characters
        cut = max(1, len(text) // 2)
        return text[:cut], text[cut:]
    cut = len(words) // 2
    return " ".join(words[:cut]), " ".join(words[cut:])
