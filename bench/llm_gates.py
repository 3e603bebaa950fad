"""Cheap checks of a recipe's LLM before a full run, each writing a markdown report.

  tokens  the LLM's tokens on the corpus: the frame classes (model.alignment.vocabulary), the share of held-out
          transcript tokens outside them, and tokens per second of speech per language (transcripts and their
          translations into each translation target), the basis of eval.max_new_tokens_per_second;
  slots   the frozen LLM reading simulated audio slots made from held-out transcripts: the slot holds the
          transcript's own token embeddings (what a perfect readout gives), at the frame rate with the blank's
          embedding between tokens as the readout spreads them, or with a share of the tokens deleted; greedy
          ASR WER/CER and S2TT BLEU through the recipe's prompts and generation settings. It bounds what stage 3
          can reach: an LLM that cannot translate a clean slot cannot translate speech.

  turns   the frozen LLM's text translation under one or more chat templates (`--chat-template`, repeatable; the
          LLM's own by default), on held-out sentences: the log-probability of the template's end-of-turn token
          after the reference reply (teacher-forced), the share of greedy replies that end with it, and their BLEU.
          The LoRA stages must teach the LLM to end its turn; a token it gives a log-probability near -20 (an
          instruction model's marker in a base model, a row it never trained) is one it learns slowly or not at
          all, and a reply that does not end runs to the length cap.

  cost    what a run spent: each stage's median seconds per step, samples and LLM target tokens per step (its
          train_log.jsonl), and the evaluation's seconds per prompt (its progress lines, in the output of the
          run, e.g. `bash launch/demo.sh 2>&1 | tee demo.log`).

examples:
    python bench/llm_gates.py tokens --config configs/tiny_part.yaml --out docs/results/llm_gates_tokens.md
    python bench/llm_gates.py slots --config configs/tiny_part.yaml --per-language 25 \\
        --out docs/results/llm_gates_slots.md
    python bench/llm_gates.py turns --config configs/tiny_part.yaml \\
        --chat-template configs/chat_templates/gemma.jinja --chat-template configs/chat_templates/base_model.jinja \\
        --out docs/results/llm_gates_turns.md
    python bench/llm_gates.py cost --run runs/tiny_part --log demo.log --out docs/results/llm_gates_cost.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections import Counter, defaultdict
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SLOT_CONDITIONS = ("clean", "frame_rate", "deleted")
FRAMES_PER_SECOND = 12.5  # the adapter's frames per second of speech (Whisper's 50 / the demo's downsample 4)


def records(shard_glob: str, language: str) -> list[dict]:
    """The JSON records of the shards `shard_glob` names for `language` (members decoded as JSON only)."""
    import glob

    from part.data.shards import iter_tar_samples

    out = []
    for shard in sorted(glob.glob(shard_glob.replace("{lang}", language))):
        for _, members in iter_tar_samples(shard, Counter()):
            out.append(json.loads(members["json"]))
    return out


def translation_target(cfg) -> str:
    """The language the recipe's last stage translates into (English when it names none)."""
    targets = cfg.stages[-1].translation_targets
    return targets[0] if targets else "en"


def left_padded(rows: list[list[int]], pad_id: int):
    """The token id rows padded on the left to one width, for batched generation, and their attention mask."""
    import torch

    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    return ids, mask


def header(cfg_path: str, command: str) -> str:
    return (f"Run {date.today().isoformat()} on {platform.node()} ({platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores), recipe `{cfg_path}`:\n\n```bash\n{command}\n```\n")


def tokens_report(cfg, cfg_path: str, command: str) -> str:
    from part.model.tokenizer import load_tokenizer
    from part.objectives.frame_vocabulary import read_frame_vocabulary

    tokenizer = load_tokenizer(cfg.model.llm.pretrained)
    vocabulary = None
    if cfg.model.alignment is not None and cfg.model.alignment.vocabulary:
        vocabulary = set(read_frame_vocabulary(cfg.model.alignment.vocabulary, len(tokenizer),
                                               blank=tokenizer.pad_token_id))
    targets = sorted({t for stage in cfg.stages for t in stage.translation_targets})
    lines = [header(cfg_path, command), f"LLM `{cfg.model.llm.pretrained}`: {len(tokenizer):,} tokens."]
    if vocabulary is not None:
        lines.append(f"Frame classes (`{cfg.model.alignment.vocabulary}`): {len(vocabulary):,}.")
    lines += ["", "| language | split | clips | hours | transcript tokens / s | held-out tokens outside the "
              "frame classes | " + " | ".join(f"→{t} tokens / s" for t in targets) + " |",
              "|---|---|---:|---:|---:|---:|" + "---:|" * len(targets)]
    for language in cfg.data.languages:
        for split, pattern in (("train", cfg.data.train_shards), ("eval", cfg.data.eval_shards)):
            rows = records(pattern, language)
            seconds = sum(r["duration"] for r in rows)
            ids = [tokenizer(r["transcript"], add_special_tokens=False)["input_ids"] for r in rows]
            count = sum(len(i) for i in ids)
            outside = "" if vocabulary is None or split == "train" else \
                f"{100 * sum(t not in vocabulary for i in ids for t in i) / max(count, 1):.2f}%"
            per_target = []
            for target in targets:
                pairs = [(r["duration"], r["translations"][target]) for r in rows
                         if target != language and target in r.get("translations", {})]
                tok = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for _, text in pairs)
                per_target.append(f"{tok / sum(d for d, _ in pairs):.2f}" if pairs else "")
            lines.append(f"| {language} | {split} | {len(rows):,} | {seconds / 3600:.2f} | {count / seconds:.2f} | "
                         f"{outside} | " + " | ".join(per_target) + " |")
    return "\n".join(lines) + "\n"


def slot_ids(ids: list[int], duration: float, condition: str, blank: int, rng: random.Random,
             deletion: float) -> list[int]:
    """The token ids whose embeddings fill the simulated slot."""
    if condition == "clean":
        return list(ids)
    if condition == "deleted":
        kept = [t for t in ids if rng.random() >= deletion]
        return kept or list(ids[:1])
    frames = max(len(ids), round(duration * FRAMES_PER_SECOND))  # each token once, at its share of the clip
    slot = [blank] * frames
    for i, token in enumerate(ids):
        slot[min(frames - 1, int((i + 0.5) * frames / len(ids)))] = token
    return slot


def slots_report(cfg, cfg_path: str, command: str, per_language: int, conditions: list[str], deletion: float,
                 batch_size: int, seed: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from part.evaluation.metrics import bleu, error_rate
    from part.model.speech_llm import SpeechLLM
    from part.model.tokenizer import load_tokenizer
    from part.prompts import AUDIO_TOKEN

    tokenizer = load_tokenizer(cfg.model.llm.pretrained)
    llm = AutoModelForCausalLM.from_pretrained(cfg.model.llm.pretrained, dtype=torch.float32).eval()
    skeleton = SpeechLLM.skeleton(cfg.model, tokenizer)  # the prompt format and generation settings, no weights
    settings = skeleton.generation_settings()
    fmt, audio_id = skeleton.prompt_format, tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    end_id, pad_id = skeleton.end_token_id, tokenizer.pad_token_id
    target = translation_target(cfg)
    rng = random.Random(seed)
    samples = []  # (condition, task, language, reference, prompt ids)
    for language in cfg.data.languages:
        for r in records(cfg.data.eval_shards, language)[:per_language]:
            ids = tokenizer(r["transcript"], add_special_tokens=False)["input_ids"]
            for condition in conditions:
                slot = slot_ids(ids, r["duration"], condition, pad_id, rng, deletion)
                tasks = [("asr", r["transcript"])]
                if language != target and target in r.get("translations", {}):
                    tasks.append(("s2tt", r["translations"][target]))
                for task, reference in tasks:
                    prompt = tokenizer(fmt.prompt(task, language, target), add_special_tokens=False)["input_ids"]
                    at = prompt.index(audio_id)
                    samples.append((condition, task, language, reference, prompt[:at] + slot + prompt[at + 1:]))
    hypotheses, started = [], time.time()
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            ids, mask = left_padded([s[4] for s in chunk], pad_id)
            out = llm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=96, **settings)
            for row in out[:, ids.shape[1]:].tolist():
                row = row[:row.index(end_id)] if end_id in row else row
                hypotheses.append(tokenizer.decode(row, skip_special_tokens=True).strip())
            done = start + len(chunk)
            print(f"[slots] {done}/{len(samples)} prompts, {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    grouped = defaultdict(lambda: ([], []))
    for (condition, task, language, reference, _), hypothesis in zip(samples, hypotheses):
        refs, hyps = grouped[(condition, task, language)]
        refs.append(reference)
        hyps.append(hypothesis)
    seconds = time.time() - started
    lines = [header(cfg_path, command),
             f"The frozen LLM `{cfg.model.llm.pretrained}` reads the first {per_language} held-out clips per "
             f"language as simulated slots (`clean`: the transcript's tokens; `frame_rate`: the same tokens spread "
             f"over {FRAMES_PER_SECOND} frames per second of the clip with the blank (pad) between them; `deleted`: "
             f"{deletion:.0%} of the tokens dropped at random), greedy, the recipe's generation settings. "
             f"ASR: WER (zh: CER) in percent, S2TT: BLEU into {target}. {len(samples)} prompts in {seconds:.0f} s "
             f"({seconds / len(samples):.2f} s per prompt, batches of {batch_size}).", "",
             "| condition | task | " + " | ".join(cfg.data.languages) + " | average |",
             "|---|---|" + "---:|" * (len(cfg.data.languages) + 1)]
    for condition in conditions:
        for task in ("asr", "s2tt"):
            cells, values = [], []
            for language in cfg.data.languages:
                if (condition, task, language) not in grouped:
                    cells.append("")
                    continue
                refs, hyps = grouped[(condition, task, language)]
                value = (error_rate(refs, hyps, language)["value"] if task == "asr"
                         else bleu(refs, hyps, target)["score"])
                cells.append(f"{value:.2f}")
                values.append(value)
            lines.append(f"| {condition} | {task} | " + " | ".join(cells) +
                         f" | {sum(values) / max(len(values), 1):.2f} |")
    examples = [(s, h) for s, h in zip(samples, hypotheses) if s[0] == conditions[0]][:6]
    lines += ["", "First hypotheses (condition `" + conditions[0] + "`):", ""]
    lines += [f"- {task} {language}: `{hypothesis[:120]}` (reference: `{reference[:120]}`)"
              for (_, task, language, reference, _), hypothesis in examples]
    return "\n".join(lines) + "\n"


def turns_report(cfg, cfg_path: str, command: str, templates: list[Path | None], per_language: int,
                 batch_size: int, max_new_tokens: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from part.evaluation.metrics import bleu
    from part.model.tokenizer import load_tokenizer
    from part.prompts import PromptFormat

    tokenizer = load_tokenizer(cfg.model.llm.tokenizer or cfg.model.llm.pretrained)
    own = tokenizer.chat_template
    llm = AutoModelForCausalLM.from_pretrained(cfg.model.llm.pretrained, dtype=torch.float32).eval()
    target = translation_target(cfg)
    pairs = [(language, r["transcript"], r["translations"][target])
             for language in cfg.data.languages if language != target
             for r in records(cfg.data.eval_shards, language)[:per_language] if target in r.get("translations", {})]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lines = [header(cfg_path, command),
             f"The frozen LLM `{cfg.model.llm.pretrained}` translates the first {per_language} held-out sentences "
             f"per language into {target} from text (the `mt` task's prompt), under each chat template. "
             "`log p(end)`: the mean log-probability of the template's end-of-turn token right after the reference "
             "translation (teacher-forced); `ended`: the share of greedy replies that write it within "
             f"{max_new_tokens} tokens; BLEU of the replies cut at the end token (or at the cap).", "",
             "| chat template | end token | log p(end) | ended | BLEU | s |", "|---|---|---:|---:|---:|---:|"]
    examples = []
    for template in templates:
        tokenizer.chat_template = own if template is None else template.read_text()
        fmt = PromptFormat.from_tokenizer(tokenizer)
        end_id = tokenizer.convert_tokens_to_ids(fmt.end_token)
        started, logps, hypotheses, ended = time.time(), [], [], 0
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            prompts = [tokenizer(fmt.prompt("mt", language, target, source), add_special_tokens=False)["input_ids"]
                       for language, source, _ in chunk]
            with torch.no_grad():
                for prompt, (_, _, reference) in zip(prompts, chunk):
                    reply = tokenizer(reference, add_special_tokens=False)["input_ids"]
                    logits = llm(torch.tensor([prompt + reply])).logits[0, -1]
                    logps.append(float(logits.log_softmax(-1)[end_id]))
                ids, mask = left_padded(prompts, pad_id)
                out = llm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   do_sample=False, eos_token_id=[end_id], pad_token_id=pad_id)
            for row in out[:, ids.shape[1]:].tolist():
                ended += end_id in row
                row = row[:row.index(end_id)] if end_id in row else row
                hypotheses.append(tokenizer.decode(row, skip_special_tokens=True).strip())
            print(f"[turns] {template or 'own template'}: {start + len(chunk)}/{len(pairs)}", file=sys.stderr,
                  flush=True)
        score = bleu([p[2] for p in pairs], hypotheses, target)["score"]
        name = "the LLM's own" if template is None else f"`{template}`"
        lines.append(f"| {name} | `{fmt.end_token}` | {sum(logps) / len(logps):.2f} | {ended}/{len(pairs)} | "
                     f"{score:.2f} | {time.time() - started:.0f} |")
        examples.append((name, hypotheses[0]))
    tokenizer.chat_template = own
    lines += ["", f"The first reply under each template (reference: `{pairs[0][2][:150]}`):", ""]
    lines += [f"- {name}: `{hypothesis[:150]!r}`" for name, hypothesis in examples]
    return "\n".join(lines) + "\n"


def cost_report(run: Path, log: Path | None, command: str) -> str:
    import re
    import statistics

    steps = defaultdict(list)
    for line in (run / "train_log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "step_time" in record:
            steps[record["stage"]].append(record)
    lines = [f"Read {date.today().isoformat()} from the run directory `{run}` (the run's own code and machine: see the "
             f"text around this report):\n\n```bash\n{command}\n```\n",
             "| stage | steps | median s / step | mean s / step | samples / step | LLM target tokens / step | "
             "audio s / step |", "|---|---:|---:|---:|---:|---:|---:|"]
    for stage, records in steps.items():
        times = [r["step_time"] for r in records]
        lines.append(f"| {stage} | {len(records)} | {statistics.median(times):.2f} | {statistics.mean(times):.2f} | "
                     f"{statistics.mean(r['samples'] for r in records):.1f} | "
                     f"{statistics.mean(r['tokens'] for r in records):.0f} | "
                     f"{statistics.mean(r['audio_seconds'] for r in records):.1f} |")
    if log is not None:
        # "[part] eval at step N: batch k/n on this rank, M min, eta E min": the last one is the rank's whole time
        done = re.findall(r"eval at step \d+: batch (\d+)/(\d+) on this rank, ([\d.]+) min", log.read_text())
        final = run / "final_hypotheses.jsonl"
        prompts = sum(1 for _ in final.open()) if final.is_file() else 0
        if done and prompts:
            minutes = float(done[-1][2])
            lines += ["", f"Evaluation: {prompts} prompts in {minutes:.1f} min on the slowest rank's clock "
                      f"({60 * minutes / prompts:.2f} s per prompt over all ranks)."]
    return "\n".join(lines) + "\n"


def config_report(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> str:
    """The report of a gate that reads the recipe (tokens, slots, turns)."""
    from part.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.command == "tokens":
        return tokens_report(cfg, args.config, command)
    if args.command == "turns":
        return turns_report(cfg, args.config, command, args.chat_template or [None], args.per_language,
                            args.batch_size, args.max_new_tokens)
    conditions = [c for c in args.conditions.split(",") if c]
    unknown = sorted(set(conditions) - set(SLOT_CONDITIONS))
    if unknown:
        parser.error(f"--conditions: unknown {unknown} (of {', '.join(SLOT_CONDITIONS)})")
    return slots_report(cfg, args.config, command, args.per_language, conditions, args.deletion, args.batch_size,
                        args.seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("tokens", "slots", "turns", "cost"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, help="also write the report here")
        if name == "cost":
            p.add_argument("--run", type=Path, required=True, help="the run's output_dir (train_log.jsonl)")
            p.add_argument("--log", type=Path, help="the run's captured output (evaluation progress lines)")
            continue
        p.add_argument("--config", default="configs/tiny_part.yaml")
        p.add_argument("overrides", nargs="*", help="config overrides, as train.py takes them")
        if name == "slots":
            p.add_argument("--per-language", type=int, default=25)
            p.add_argument("--conditions", default=",".join(SLOT_CONDITIONS))
            p.add_argument("--deletion", type=float, default=0.4)
            p.add_argument("--batch-size", type=int, default=16)
            p.add_argument("--seed", type=int, default=0)
        if name == "turns":
            p.add_argument("--chat-template", type=Path, action="append", default=[],
                           help="a Jinja chat template file (repeatable); default: the LLM's own")
            p.add_argument("--per-language", type=int, default=20)
            p.add_argument("--batch-size", type=int, default=8)
            p.add_argument("--max-new-tokens", type=int, default=80)
    args = parser.parse_args(argv)
    command = "python bench/llm_gates.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.command == "cost":
        report = cost_report(args.run, args.log, command)
    else:
        report = config_report(parser, args, command)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
