#!/usr/bin/env bash
# The whole GR-1 pipeline on a fresh CPU machine, in the built-in pybullet scene:
#   install -> record demonstrations -> calvin2lmdb -> accelerate launch Main.py (tiny model) -> evaluation
#   (the trained policy and a zero-action baseline).
# Usage: bash scripts/demo.sh            (outputs in ./demo_run; re-running skips the steps already done)
# Environment: OUT=<folder> to write elsewhere; DEMO_EPISODES / DEMO_SEQUENCES to change the sizes; DEMO_THREADS
# torch threads of the training and evaluation processes (default: every core; 1 on a machine busy with other work,
# where threads that wait for each other at every operation make a step many times slower).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo_run}
EPISODES=${DEMO_EPISODES:-30}
SEQUENCES=${DEMO_SEQUENCES:-20}
TASKS=turn_on_led,turn_off_led,push_red_block_left,push_red_block_right,lift_red_block_table
CONFIG=configs/demo.json
# accelerate launch sets OMP_NUM_THREADS=1 for CPU processes unless told otherwise: give the one process every core
LAUNCH="accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
  --num_cpu_threads_per_process ${DEMO_THREADS:-$(nproc)}"
start=$SECONDS
step() { printf '\n== [%4ds] %s\n' $((SECONDS - start)) "$*"; }

step "install (virtual environment .venv unless one is active; nothing to do when it is up to date)"
. scripts/env.sh
export TQDM_MININTERVAL=5

step "record $EPISODES demonstration episodes with the scripted expert ($TASKS)"
if [ ! -f "$OUT/demos/manifest.json" ]; then
  rm -rf "$OUT/demos"
  # The demo's frozen encoders are random (no weights can be downloaded here), so each window is annotated with
  # the evaluation instruction itself: random CLIP weights cannot relate paraphrases to it.
  python -m evaluation.builtin_env.record --output_dir "$OUT/demos" --episodes "$EPISODES" --val_episodes 3 \
    --workers 2 --annotations validation --tasks "$TASKS"
fi

step "convert to LMDB"
if [ ! -f "$OUT/lmdb.done" ]; then
  python calvin2lmdb.py --input_dir "$OUT/demos" --output_dir "$OUT/lmdb"  # resumes an interrupted conversion
  touch "$OUT/lmdb.done"
fi

step "train a tiny GR-1 on CPU"
if [ ! -f "$OUT/train/done" ]; then
  $LAUNCH Main.py \
    --config "$CONFIG" "LMDB_path=$OUT/lmdb" "save_path=$OUT/train/" resume=true
  touch "$OUT/train/done"
fi
CKPT=$(ls -v "$OUT"/train/GR1_*.pth | tail -n 1)

step "evaluate the trained policy in the built-in scene ($SEQUENCES sequences, with videos)"
# The checkpoint carries its architecture (and its random encoders): no --config; only evaluation keys are given,
# among them the demo recipe's shorter subtask limit (the built-in scene's tasks take far fewer than 360 steps).
EP_LEN=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['ep_len'])" "$CONFIG")
$LAUNCH evaluate_calvin.py \
  "ckpt_path=$CKPT" "eval_dir=$OUT/eval" "num_sequences=$SEQUENCES" "builtin_tasks=$TASKS" "ep_len=$EP_LEN" \
  record_evaluation_video=true

step "evaluate the zero-action baseline on the same sequences"
python evaluate_calvin.py --config "$CONFIG" eval_policy=zero "eval_dir=$OUT/eval_zero" \
  "num_sequences=$SEQUENCES" "builtin_tasks=$TASKS"

step "done in $((SECONDS - start)) s"
python - "$OUT" "$CKPT" <<'EOF'
import json, os, sys
out, ckpt = sys.argv[1], sys.argv[2]
trained = json.load(open(os.path.join(out, "eval", "result.txt")))["null"]
zero = json.load(open(os.path.join(out, "eval_zero", "result.txt")))["null"]
videos = sorted(os.listdir(os.path.join(out, "eval", "videos")))
print(f"checkpoint:        {ckpt}")
print(f"training curves:   {os.path.join(out, 'train', 'training_curves.png')}")
print(f"TensorBoard logs:  tensorboard --logdir {os.path.join(out, 'train', 'logs')}")
print(f"results:           {os.path.join(out, 'eval')} (result.txt, success_rate.txt, sequences.jsonl)")
print(f"charts:            {os.path.join(out, 'eval', 'chain_success.png')}, "
      f"{os.path.join(out, 'eval', 'task_success.png')}")
print(f"a video:           {os.path.join(out, 'eval', 'videos', videos[0]) if videos else 'none'}")
for name, r in (("trained GR-1", trained), ("zero action ", zero)):
    rates = " ".join(f"{k}/5 {v * 100:.0f}%" for k, v in r["chain_sr"].items())
    print(f"{name}: avg length {r['avg_seq_len']:.2f}  chain success {rates}")
EOF
echo
echo "tests:             bash scripts/test.sh"
echo "in your shell:     . $VIRTUAL_ENV/bin/activate   (then accelerate launch Main.py ..., evaluate_calvin.py ...)"
