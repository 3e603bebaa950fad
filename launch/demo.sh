#!/usr/bin/env bash
# The main job on the embedded default, end to end on one machine:
#   environment -> synthetic multilingual corpus (FLORES-200 + espeak-ng, 8 languages) -> tiny encoder/LLM and
#   tokenizer -> the five PART stages under DeepSpeed ZeRO-3 on NPROC ranks -> evaluation on held-out FLORES
#   devtest speech -> the per-language table.
# Variables: CONFIG (default configs/tiny_part.yaml), NPROC (ranks, default 2), extra arguments are config
# overrides (e.g. `bash launch/demo.sh stages.0.steps=50`). Re-running reuses the corpus and models in cache/.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/tiny_part.yaml}
NPROC=${NPROC:-2}
# CPU ranks share the cores: one thread each unless told otherwise (no effect on GPU kernels).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
bash launch/setup_env.sh
# shellcheck disable=SC1091
source .venv/bin/activate

if [ ! -f cache/corpus/eval/index.json ]; then
  python -m data_prep.synthetic --out cache/corpus --train-per-language 400 --eval-per-language 30 \
    --text-per-language 500 --shard-mb 4 --shard-samples 100 --max-duration 20 --workers 2
fi
if [ ! -f cache/tiny/llm/config.json ]; then
  python -m part.tiny --text cache/corpus/tokenizer_text.txt --out cache/tiny --corpus cache/corpus --pretrain-steps 400
fi
output_dir=$(python -c "import sys; from part.config import load_config; print(load_config(sys.argv[1], sys.argv[2:]).output_dir)" "$CONFIG" "$@")
python train.py --config "$CONFIG" --check --world-size "$NPROC" "$@"
deepspeed --num_gpus "$NPROC" train.py --config "$CONFIG" --resume "$@"
echo
echo "== results ($output_dir/final.md; hypotheses in final_hypotheses.jsonl) =="
cat "$output_dir/final.md"
