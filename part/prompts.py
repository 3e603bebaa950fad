"""Task prompts. A sample becomes (prompt text with one audio placeholder or none, target text).

What the task asks (`user_message`) is written here once; how a turn is framed for the LLM is a `PromptFormat`,
read from the LLM tokenizer's own chat template (`PromptFormat.from_tokenizer`), with ChatML (`CHATML`) for
tokenizers that have none. The format also names the end-of-turn token that ends every target and stops
generation.
"""

from __future__ import annotations

from dataclasses import dataclass

AUDIO_TOKEN = "<|audio|>"
TURN_START = "<|im_start|>"  # ChatML, the fallback format's markers
TURN_END = "<|im_end|>"

LANGUAGE_NAMES = {
    "en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
    "ru": "Russian", "zh": "Chinese", "ja": "Japanese", "ko": "Korean", "nl": "Dutch", "pl": "Polish",
    "tr": "Turkish", "ar": "Arabic", "hi": "Hindi", "vi": "Vietnamese", "uk": "Ukrainian", "yue": "Cantonese",
    "th": "Thai", "sv": "Swedish",
}

# Stand-ins rendered through a chat template to find where the user's message and the assistant's reply go.
_USER_SLOT = "PARTUSERSLOT0"
_REPLY_SLOT = "PARTREPLYSLOT0"


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)


def user_message(task: str, source: str, target: str | None = None, text: str | None = None) -> str:
    """What the user turn says for `task`; speech tasks carry the audio placeholder, text tasks the source text."""
    if task == "asr":
        return f"{AUDIO_TOKEN}\nTranscribe the {language_name(source)} audio."
    if task == "s2tt":
        return f"{AUDIO_TOKEN}\nTranslate the {language_name(source)} audio into {language_name(target)}."
    if task == "mt":
        return f"Translate this {language_name(source)} text into {language_name(target)}:\n{text}"
    if task == "text":
        return f"Continue this {language_name(source)} text:\n{text}"
    raise ValueError(f"unknown task '{task}'")


@dataclass(frozen=True)
class PromptFormat:
    """How one LLM frames a turn: a prompt is `before` + the user's message + `after` (which ends with the
    assistant's generation prompt); a target is followed by `end_token`, the token that closes the assistant's
    turn, on which generation stops. `markers` are the format's control tokens (the end token among them): the
    vocabulary must hold each as one token, and generation must emit none but the end token.

    Plain strings only: built once from the tokenizer, then cheap to apply and to send to data workers.
    """

    before: str
    after: str
    end_token: str
    markers: tuple[str, ...]
    from_template: bool = False

    def prompt(self, task: str, source: str, target: str | None = None, text: str | None = None) -> str:
        return self.before + user_message(task, source, target, text) + self.after

    @classmethod
    def chatml(cls, system: str | None = None) -> PromptFormat:
        head = f"{TURN_START}system\n{system}{TURN_END}\n" if system is not None else ""
        return cls(f"{head}{TURN_START}user\n", f"{TURN_END}\n{TURN_START}assistant\n", TURN_END,
                   (TURN_START, TURN_END))

    @classmethod
    def from_tokenizer(cls, tokenizer, system: str | None = None) -> PromptFormat:
        """The tokenizer's chat template, rendered with a user turn (after a system turn holding `system`, when
        given) and the generation prompt; ChatML when the tokenizer has no template.

        The end token is the first special (or added) token the template writes after an assistant reply
        (Qwen2 `<|im_end|>`, Llama 3 `<|eot_id|>`, Gemma `<end_of_turn>`); `<|im_end|>` when it writes none.
        The template is rendered once, here: a template that prints the date (Llama 3.2) is frozen for the
        process, so every sample of a run gets the same prompt.
        """
        if not getattr(tokenizer, "chat_template", None):
            return cls.chatml(system)
        head = [{"role": "system", "content": system}] if system is not None else []

        def render(messages: list[dict], generation_prompt: bool) -> str:
            try:
                out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            except Exception as exc:  # jinja's TemplateError, or the template's own raise_exception
                raise ValueError(f"the tokenizer's chat template cannot render {[m['role'] for m in messages]} "
                                 f"turns: {exc}") from exc
            if not isinstance(out, str):
                raise ValueError(f"the tokenizer's chat template rendered {type(out).__name__}, not text")
            return out

        prompt = render([*head, {"role": "user", "content": _USER_SLOT}], True)
        if prompt.count(_USER_SLOT) != 1:
            raise ValueError("the tokenizer's chat template does not write the user's message exactly once")
        before, after = prompt.split(_USER_SLOT)
        probe = user_message("asr", "en")  # the template must not rewrite a message (only trim it, at most)
        if render([*head, {"role": "user", "content": probe}], True) != before + probe + after:
            raise ValueError("the tokenizer's chat template changes the user's message: prompts cannot follow it")

        dialogue = render([*head, {"role": "user", "content": _USER_SLOT},
                           {"role": "assistant", "content": _REPLY_SLOT}], False)
        if _REPLY_SLOT not in dialogue:
            raise ValueError("the tokenizer's chat template does not write the assistant's reply")
        # Special tokens only: a vocabulary may list text pieces among its added tokens (Gemma's "\n").
        added = getattr(tokenizer, "added_tokens_decoder", {})
        control = set(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}
        tail = tokenizer(dialogue.rsplit(_REPLY_SLOT, 1)[1], add_special_tokens=False)["input_ids"]
        end = next((tokenizer.convert_ids_to_tokens(i) for i in tail if i in control), TURN_END)
        used = tokenizer(prompt + dialogue, add_special_tokens=False)["input_ids"]
        markers = dict.fromkeys(tokenizer.convert_ids_to_tokens(i) for i in used if i in control)
        markers.pop(AUDIO_TOKEN, None)
        markers[end] = None
        return cls(before, after, end, tuple(markers), from_template=True)


CHATML = PromptFormat.chatml()


def instruction(task: str, source: str, target: str | None = None, text: str | None = None) -> str:
    """The ChatML prompt for `task` (tokenizers without a chat template); see `PromptFormat.prompt`."""
    return CHATML.prompt(task, source, target, text)


def split_for_text_task(text: str) -> tuple[str, str]:
    """For the `text` (continuation) task: the first half of the words is the prompt, the rest the target."""
    words = text.split()
    if len(words) < 2:  # scripts without spaces: split characters
        cut = max(1, len(text) // 2)
        return text[:cut], text[cut:]
    cut = len(words) // 2
    return " ".join(words[:cut]), " ".join(words[cut:])
