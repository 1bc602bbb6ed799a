#!/usr/bin/env bash
# Issue 15: what would bring the CPU demo to counting 0.60 and pointing F1 0.50 within its minutes, on a CPU with AMX
# (bf16 matrix instructions; the joint stage's steps of 8 rows took 0.195 s there, ~2,850 of them fitting its 10.7
# minutes)? The CPU demo's chain replayed on one GPU, each variant with the steps that fit that CPU's minutes, scored
# on the 200 test images. Three groups, one call each (~5-8 min on one H200, 16 cores):
#   width:  the LLM 128 (the preset), 192, 256 (also at lr 5e-4), 384 wide, 256 x 6 blocks, 128 x 2 blocks
#           (assets/bench/resized_llm.py; 8-row steps of 0.195, 0.27, 0.385, 0.579, 0.507, 0.135 s on that CPU)
#   levers: twice the joint steps; stage 1 at 450 steps; stage 1 with the scene loss; lr 2e-3; the ViT learning
#   rows:   4 and 2 rows a step (0.119 and 0.080 s on that CPU), at the same minutes
#   vitmuon: stage 1's ViT by Muon (train_vision.py --muon_lr) with the scene loss, 600 and 800 steps (0.29 s each
#           there), the joint stage given what the longer stage 1 leaves of the minutes; and without the scene loss
#   vitmuon2: the same stage 1 at 16 images a step (0.174 s there), 600 and 900 steps; at 450 steps of 32; the joint
#           stage's Muon rate at 0.007 and 0.015 after 600 steps of 32
#   kinds:  stage 1 (Muon, the scene loss) varied for the kinds it names in the minutes of 600 steps: big_vision's
#           start, the scene loss at 2, Muon at 0.03, 64 images a step for 300 steps, each batch twice (800 updates),
#           a 100-step warmup, 150 steps in the easy world first; each then the joint stage's 2,900 steps
#   crops:  9 crops an image (3 x 3 tiles) against the demo's 4, stage 1 at 9 crops too (650 steps of 16 images, ~the
#           minutes of 600 of 32 at 4); the joint stage without the captions (rows of 288: 3,700 steps in the minutes
#           of 2,900), or with them for its first or last half of the minutes only; big_vision's start
#   queries: the world with 1 or 2 more counting or pointing questions on each training image (prepare_data.py
#           --extra_queries), rows of 416 / 448 tokens (2,620 / 2,430 steps in the minutes of 2,900 of 368)
#   bvx2:   stage 1 from big_vision's start (--vit_init=big_vision), its joint stage in the world of 2 more questions
#           an image (three seeds) and in the plain world (the queries group ran seed 1337)
#   vitmuon3: after 600 steps of 32, the joint stage's AdamW rates (token tables, norms) at 3e-3 and 2,750 joint
#           steps; stage 1 with the scene loss at 0.5 and with the localisation losses at 2
#   digits: stage 1's scene loss also names the second digit of each centre's x and y (assets/bench/scene_digits.py),
#           or the first too; each then the joint stage in the world of 2 more questions an image, three seeds
#   digits2: the first digits alone (train_vision.py --scene_digits; the same stage 1 as the script's PLACES=100),
#           and with the localisation losses at 2
#   digits3: the first digits (train_vision.py --scene_digits) at 1, 0.5 and 0.25, the localisation losses at 2
#   steps:  the joint stage at 2,800 steps (the CPU's minutes with its blocks compiled) against the 2,430 of the
#           digits groups, after the demo's stage 1 and after the one that also names the first digits
#   tokens: after the demo's stage 1, the joint stage's 2,800 steps with its image tokens also naming the first
#           digits of the centre they hold (train_joint.py --token_loss) at 0.3 and 1.0, and its kind and colour
#           too at 0.3 (against the steps group's x2800: the same stage 1, which replays bit for bit on one GPU)
#   tokens2: the same with all four attributes at 1.0 and 0.1, and the kind and colour alone at 0.3
#   tokens3: all four at 1.0 with the kind and colour weighted 2 and 4 (train_joint.py --token_weights); and at the
#           steps a slow day left the CPU (stage 1 480, the joint stage 2,200), all four weighted 1
#   tokens4: the kind and colour weighted 4: with batches of rows of like length (train_joint.py --length_groups=8)
#           at 2,800 steps; at a slow day's steps (2,200), and with the ~9% more that length groups fit there
#   tokens5: at a slow day's steps, the kind and colour weighted 8; the kind 8 and the colour 2; and weighted 4
#           after a stage 1 of 600 steps, not 480, the joint stage then 2,010 steps (the CPU's 42 s of 120 stage-1 steps)
#   share:  a CPU half as fast (2026-12-03's: stage 1 334 steps in its 2.98 minutes, joint steps of ~0.48 s): stage 1
#           given 25% (334 steps, joint 1,150), 35% (468, 1,000) or 45% (600, 850) of the stages' 12.2 minutes
#   share2: the same CPU, stage 1 given 15% (200 steps, joint 1,300) or 20% (267, 1,225)
#   wsd:    at a full-speed day's steps (stage 1 600, the joint stage 2,550): stage 1's schedule holding its peak
#           until the last half or quarter of its steps (--lr_decay_frac), Muon at 0.03, the scene loss at 2, no weight
#           decay (one joint seed each after it); the joint stage's own peak held until its last 30%, three seeds
#   wsd2:   stage 1's peak held until its last 25% (three joint seeds), with the scene loss at 2 too (three), until
#           its last 15% (one)
#   margins: the crops' overlap margins at (2, 2) (the demo's: a 224-px image's high-res view shrunk to 168 px, 6 x 6
#           tokens), (1, 1) (196 px, 7 x 7) and (0, 0) (224 px, 8 x 8) in every stage, the same five crops an image
#           for the ViT; the joint stage's rows of 448 / 464 / 480 tokens and 2,550 / 2,410 / 2,375 steps (step times
#           measured on the CPU at the three), three seeds each
#   margins2: stage 1 at (1, 1), then align and the joint stage at the demo's (2, 2) and steps, against the demo's
#           chain, three seeds each
#   world5k: the demo's chain in a world of 5,000 training images against its 10,000 (stage 1 and align in each), the
#           joint stage at the 2,550 steps of both and at 2,850 in the smaller one, three seeds each
#   slowcpu: at the steps of a 2-core CPU with AVX512-BF16 but no AMX (2026-12-04's AMD EPYC: stage 1 ~360 steps, the
#           joint stage ~1,500), the demo's world of 5,000 against one of 2,500 (the same steps, and the ~10% more its
#           kept ViT features fit), and the joint stage's Muon rate at 0.015, three seeds each
#   amx2500: at the AMX CPU's steps (stage 1 600, the joint stage 2,850), the worlds of 5,000 and 2,500 (and 3,100
#           steps in the smaller, the more its kept features fit), three seeds each
#   slowshare: at the AMD CPU's steps since its joint step got the key blocks and joined rows (2026-12-05: stage 1
#           ~390 steps of ~0.44 s, the joint stage ~1,950 of ~0.30 s), stage 1 given 390, 500 or 600 steps and the
#           joint stage what is left (1,950, 1,800, 1,650); and the world of 2,500 at 390 / 1,950; three seeds each
#           (SEEDS="1340 1341 1342": three more)
#           (slowcpu and amx2500 not yet run: 2026-12-04's device call was lost with the machine; BENCHMARKS.md "The
#           world of 2,500 on the slower CPU")
# BENCHMARKS.md "The CPU demo on a CPU with AMX" holds the results (vitmuon: "Stage 1 by Muon"; wsd, wsd2: "Stage
#   1's peak held"; margins, margins2: "The crops' overlap margins"; world5k: "A smaller world for the CPU demo"). On
#   a GPU machine:
#   bash assets/bench/demo_cpu_levers.sh OUT_DIR width|levers|rows|vitmuon
set -u
OUT=${1:?out dir}
GROUP=${2:?width, levers or rows}
RUNS=out/levers_cpu
source "$(dirname "$0")/replay_common.sh"
vision() {  # name llm(w,i,l) stage-1 args: stage 1, then the align stage around an LLM of that size
  local name=$1 llm=$2; shift 2
  $PY ${WRAP:-} train_vision.py config/demo_vision.py $LOC_STAGE1 --loader_workers=2 --out_dir=$RUNS/v-$name \
      --save_every=0 "$@" \
      > "$OUT/v-$name.log" 2>&1 || stamp "v-$name failed"
  LLM=$llm $PY assets/bench/resized_llm.py train_align.py config/demo_align.py --vit_from=$RUNS/v-$name \
      --out_dir=$RUNS/a-$name --loader_workers=1 ${ALIGN_ARGS:-} > "$OUT/a-$name.log" 2>&1 || stamp "a-$name failed"
  stamp "v-$name: $(grep 'val loc' "$OUT/v-$name.log" | tail -1 | grep -o 'count_acc.*')"
}
joint() {  # name align seed joint-args
  local name=$1 A=$RUNS/a-$2 seed=$3 dir=$RUNS/$1-s$3; shift 3
  $PY train_joint.py config/demo_joint.py --init_from=$A --eval_every=100000 --save_every=0 --seed=$seed \
      --loader_workers=1 --log_every=100 --out_dir=$dir "$@" > "$OUT/$name-s$seed.log" 2>&1 \
      || { stamp "$name-s$seed failed"; return; }
  score $dir $name-s$seed
  $PY assets/bench/count_errors.py $dir/eval/predictions.jsonl data/demo > "$OUT/$name-s$seed-counts.txt" 2>&1
}
easy_world() {  # stage 1's easy world (as demo.py --recipe=gpu makes it): one large solid shape or none
  [ -f data/easy/synth_image/test.jsonl ] || $PY prepare_data.py --dataset=synthetic --out=data/easy \
      --shape_style=big_solid --max_objects=1 --train_images=10000 > /dev/null
}
# the digits groups: the demo's stage 1 (600 Muon steps, the scene loss) and its joint stage in the world of 2 more
# questions an image, whose 2,430 steps of 448 fit the CPU's minutes
S600="--muon_lr=0.02 --scene_weight=1.0 --scene_balanced=True --max_steps=600 --eval_every=300"
X2="--max_steps=2430 --data_dir=data/demo_x2 --max_seq_len=448"
W="$S600 --lr_decay_frac=0.25 --scene_weight=2.0"  # the demo's stage 1 as committed (held peak, scene loss 2)
x2_world() {  # [N]: the world of 2 more questions an image with N training images (10,000: data/demo_x2)
  local n=${1:-10000} dir=data/demo_x2${1:+_$1}
  [ -f $dir/synth_image/test.jsonl ] || $PY prepare_data.py --dataset=synthetic --out=$dir \
      --max_objects=5 --train_images=$n --extra_queries=2 > /dev/null
}
two_stage1s() {  # the x2 world, the demo's stage 1 (tok) and one of a slow day's 480 steps (tok480), and their align
  x2_world
  vision tok 128,512,4 $S600 &
  vision tok480 128,512,4 $S600 --max_steps=480 &
  wait
}
three_seeds() {  # name stage-1 args: that stage 1 (and align), then its joint stage in that world, seeds 1337-1339
  local name=$1; shift
  vision $name 128,512,4 $S600 "$@"
  for seed in 1337 1338 1339; do joint ${name}x2 $name $seed $X2 & done
  wait
}
case $GROUP in
width)
  vision base 128,512,4 --max_steps=300 --eval_every=300
  for spec in "w192|192,768,4|1800" "w256|256,1024,4|1270" "w384|384,1536,4|850" "w256x6|256,1024,6|960" \
              "w128x2|128,512,2|3600"; do
    IFS='|' read -r name llm steps <<< "$spec"
    ( LLM=$llm $PY assets/bench/resized_llm.py train_align.py config/demo_align.py --vit_from=$RUNS/v-base \
          --out_dir=$RUNS/a-$name --loader_workers=1 > "$OUT/a-$name.log" 2>&1
      joint $name $name 1337 --max_steps=$steps &
      case $name in w192|w256|w384) joint $name $name 1338 --max_steps=$steps & ;; esac
      [ $name = w256 ] && joint w256lr5 w256 1337 --max_steps=$steps --lr_llm=5e-4 --lr_connector=5e-4 &
      wait ) &
  done
  joint w128 base 1337 --max_steps=2500 & joint w128 base 1338 --max_steps=2500 &
  ;;
levers)
  vision base 128,512,4 --max_steps=300 --eval_every=300 &
  vision s450 128,512,4 --max_steps=450 --warmup=45 --eval_every=450 &
  vision scene 128,512,4 --max_steps=300 --eval_every=300 --scene_weight=1.0 --scene_balanced=True &
  wait
  for seed in 1337 1338; do
    joint steps2x base $seed --max_steps=5700 --eval_every=1900 --eval_answers=100 --loader_workers=2 &
    joint base base $seed --max_steps=2850 &
    joint s450 s450 $seed --max_steps=2850 &
    joint scene scene $seed --max_steps=2850 &
  done
  joint lr2e3 base 1337 --max_steps=2850 --lr_llm=2e-3 --lr_connector=2e-3 &
  joint vitlr base 1337 --max_steps=2850 --lr_vit=1e-4 &
  ;;
rows)
  vision base 128,512,4 --max_steps=300 --eval_every=300
  joint rows4 base 1337 --max_steps=4670 --batch_size=4 & joint rows4 base 1338 --max_steps=4670 --batch_size=4 &
  joint rows4lr7 base 1337 --max_steps=4670 --batch_size=4 --lr_llm=7e-4 --lr_connector=7e-4 &
  joint rows2 base 1337 --max_steps=6950 --batch_size=2 &
  joint base base 1337 --max_steps=2850 &
  ;;
vitmuon)
  S="--muon_lr=0.02 --scene_weight=1.0 --scene_balanced=True"
  vision base 128,512,4 --max_steps=300 --eval_every=300 &
  vision m300 128,512,4 --max_steps=300 --eval_every=300 --muon_lr=0.02 &
  vision ms600 128,512,4 --max_steps=600 --eval_every=300 $S &
  vision ms800 128,512,4 --max_steps=800 --eval_every=400 $S &
  wait
  for seed in 1337 1338; do
    joint ms600 ms600 $seed --max_steps=2400 &
    joint ms800 ms800 $seed --max_steps=2150 &
  done
  joint base base 1337 --max_steps=2750 &
  joint m300 m300 1337 --max_steps=2750 &
  joint ms800x ms800 1337 --max_steps=2750 &
  ;;
vitmuon2)
  S="--muon_lr=0.02 --scene_weight=1.0 --scene_balanced=True"
  vision ms600 128,512,4 --max_steps=600 --eval_every=600 $S &
  vision ms450 128,512,4 --max_steps=450 --eval_every=450 $S &
  vision b16x600 128,512,4 --max_steps=600 --eval_every=600 --batch_size=16 $S &
  vision b16x900 128,512,4 --max_steps=900 --eval_every=900 --batch_size=16 $S &
  wait
  for seed in 1337 1338; do
    joint b16x600 b16x600 $seed --max_steps=2750 &
    joint b16x900 b16x900 $seed --max_steps=2510 &
    joint ms450 ms450 $seed --max_steps=2630 &
  done
  joint ms600 ms600 1339 --max_steps=2400 &
  joint ms600mu15 ms600 1337 --max_steps=2400 --muon_lr=0.015 &
  joint ms600mu07 ms600 1337 --max_steps=2400 --muon_lr=0.007 &
  ;;
vitmuon3)
  S="--muon_lr=0.02 --scene_balanced=True --max_steps=600 --eval_every=600"
  vision ms600 128,512,4 $S --scene_weight=1.0 &
  vision sw05 128,512,4 $S --scene_weight=0.5 &
  vision lw2 128,512,4 $S --scene_weight=1.0 --loc_weight=2.0 &
  wait
  for seed in 1337 1338; do
    joint llm3e3 ms600 $seed --max_steps=2400 --lr_llm=3e-3 &
    joint sw05 sw05 $seed --max_steps=2400 &
    joint ms600x ms600 $seed --max_steps=2750 &
  done
  joint conn3e3 ms600 1337 --max_steps=2400 --lr_connector=3e-3 &
  joint lw2 lw2 1337 --max_steps=2400 &
  ;;
kinds)
  S="--muon_lr=0.02 --scene_weight=1.0 --scene_balanced=True --max_steps=600 --eval_every=300"
  easy_world
  ( $PY train_vision.py config/demo_vision.py $S --max_steps=150 --eval_every=150 --data_dir=data/easy \
        --loader_workers=2 --out_dir=$RUNS/v-easy150part --save_every=0 > "$OUT/v-easy150part.log" 2>&1
    vision easy150 128,512,4 $S --max_steps=450 --eval_every=450 --init_from=$RUNS/v-easy150part ) &
  vision ms600 128,512,4 $S &
  vision bv 128,512,4 $S --vit_init=big_vision &
  vision sw2 128,512,4 $S --scene_weight=2.0 &
  vision mu03 128,512,4 $S --muon_lr=0.03 &
  vision b64 128,512,4 $S --batch_size=64 --max_steps=300 --warmup=15 --eval_every=300 &
  vision echo2 128,512,4 $S --batch_echo=2 --max_steps=800 --eval_every=400 &
  vision w100 128,512,4 $S --warmup=100 &
  wait
  for name in ms600 bv sw2 mu03 b64 echo2 w100 easy150; do joint $name $name 1337 --max_steps=2900 & done
  ;;
crops)
  S="--muon_lr=0.02 --scene_weight=1.0 --scene_balanced=True --max_steps=600 --eval_every=300"
  C9="--max_crops=9 --max_seq_len=400"
  NOCAP="--styles=('point_count','pointing','short_answer') --max_seq_len=288"
  chain() {  # name seed stepsA argsA stepsB argsB: the joint stage in two runs, the second from the first's model
    local name=$1 seed=$2 dir=$RUNS/$1-s$2
    $PY train_joint.py config/demo_joint.py --init_from=$RUNS/a-ms600 --eval_every=100000 --save_every=0 \
        --seed=$seed --loader_workers=1 --log_every=100 --out_dir=$dir-A --max_steps=$3 $4 \
        > "$OUT/$name-s$seed-A.log" 2>&1
    $PY train_joint.py config/demo_joint.py --init_from=$dir-A --eval_every=100000 --save_every=0 \
        --seed=$seed --loader_workers=1 --log_every=100 --out_dir=$dir --max_steps=$5 $6 \
        > "$OUT/$name-s$seed.log" 2>&1 || { stamp "$name-s$seed failed"; return; }
    score $dir $name-s$seed
    $PY assets/bench/count_errors.py $dir/eval/predictions.jsonl data/demo > "$OUT/$name-s$seed-counts.txt" 2>&1
  }
  ( vision ms600 128,512,4 $S
    joint ms600 ms600 1337 --max_steps=2900 &
    joint nocap ms600 1337 --max_steps=3700 $NOCAP &
    chain capfirst 1337 1450 "" 1850 "$NOCAP" &
    chain capfirst 1338 1450 "" 1850 "$NOCAP" &
    chain caplast 1337 1850 "$NOCAP" 1450 "" &
    wait ) &
  ( vision c9b16 128,512,4 $S --max_crops=9 --batch_size=16 --max_steps=650 --eval_every=325
    $PY train_align.py config/demo_align.py --vit_from=$RUNS/v-c9b16 --out_dir=$RUNS/a-c9b16c9 --loader_workers=1 \
        --max_crops=9 > "$OUT/a-c9b16c9.log" 2>&1 || stamp "a-c9b16c9 failed"
    joint c9b16 c9b16c9 1337 --max_steps=2600 $C9 ) &
  ( vision bv 128,512,4 $S --vit_init=big_vision; joint bv bv 1337 --max_steps=2900 ) &
  ;;
queries)
  S="--muon_lr=0.02 --scene_weight=1.0 --scene_balanced=True --max_steps=600 --eval_every=300"
  for n in 1 2; do
    [ -f data/demo_x$n/synth_image/test.jsonl ] || $PY prepare_data.py --dataset=synthetic --out=data/demo_x$n \
        --max_objects=5 --train_images=10000 --extra_queries=$n > /dev/null
  done
  ( vision ms600 128,512,4 $S
    for seed in 1337 1338; do
      joint ms600 ms600 $seed --max_steps=2900 &
      joint x1 ms600 $seed --max_steps=2620 --data_dir=data/demo_x1 --max_seq_len=416 &
      joint x2 ms600 $seed --max_steps=2430 --data_dir=data/demo_x2 --max_seq_len=448 &
    done
    joint x2 ms600 1339 --max_steps=2430 --data_dir=data/demo_x2 --max_seq_len=448 &
    wait ) &
  ( vision bv 128,512,4 $S --vit_init=big_vision; joint bv bv 1337 --max_steps=2900 ) &
  ;;
bvx2)
  S="--muon_lr=0.02 --scene_weight=1.0 --scene_balanced=True --max_steps=600 --eval_every=300"
  [ -f data/demo_x2/synth_image/test.jsonl ] || $PY prepare_data.py --dataset=synthetic --out=data/demo_x2 \
      --max_objects=5 --train_images=10000 --extra_queries=2 > /dev/null
  vision bv 128,512,4 $S --vit_init=big_vision
  for seed in 1337 1338 1339; do
    joint bvx2 bv $seed --max_steps=2430 --data_dir=data/demo_x2 --max_seq_len=448 &
  done
  joint bv bv 1338 --max_steps=2900 &
  ;;
digits)
  x2_world
  ( vision ms600 128,512,4 $S600; joint x2 ms600 1337 $X2 ) &
  ( PLACES=10 WRAP=assets/bench/scene_digits.py three_seeds dg10 ) &
  ( PLACES=100,10 WRAP=assets/bench/scene_digits.py three_seeds dg100 ) &
  ;;
digits2)
  x2_world
  three_seeds dgh --scene_digits=1.0 &
  three_seeds dghl2 --scene_digits=1.0 --loc_weight=2.0 &
  ;;
digits3)
  x2_world
  for w in 1.0 0.5 0.25; do three_seeds dghl2w$w --scene_digits=$w --loc_weight=2.0 & done
  ;;
steps)
  x2_world
  X2=${X2/2430/2800}
  three_seeds x2800 &
  three_seeds dgh2800 --scene_digits=1.0 &
  ;;
tokens)
  x2_world
  X2=${X2/2430/2800}
  vision tok 128,512,4 $S600
  for seed in 1337 1338 1339; do
    joint tok03x2 tok $seed $X2 --token_loss=0.3 &
    joint tok1x2 tok $seed $X2 --token_loss=1.0 &
    joint tokallx2 tok $seed $X2 --token_loss=0.3 "--token_attributes=('kind', 'colour', 'x_tenths', 'y_tenths')" &
  done
  ;;
tokens2)
  x2_world
  X2=${X2/2430/2800}
  vision tok 128,512,4 $S600
  ALL="--token_attributes=('kind', 'colour', 'x_tenths', 'y_tenths')"
  for seed in 1337 1338 1339; do
    joint tokall1x2 tok $seed $X2 --token_loss=1.0 "$ALL" &
    joint tokall01x2 tok $seed $X2 --token_loss=0.1 "$ALL" &
    joint tokkcx2 tok $seed $X2 --token_loss=0.3 "--token_attributes=('kind', 'colour')" &
  done
  ;;
tokens3)
  two_stage1s
  for seed in 1337 1338 1339; do
    joint tokkc2x2 tok $seed ${X2/2430/2800} --token_loss=1.0 "--token_weights=(2.0, 2.0, 1.0, 1.0)" &
    joint tokkc4x2 tok $seed ${X2/2430/2800} --token_loss=1.0 "--token_weights=(4.0, 4.0, 1.0, 1.0)" &
    joint slowx2 tok480 $seed ${X2/2430/2200} --token_loss=1.0 &
  done
  ;;
tokens4)
  two_stage1s
  KC4="--token_weights=(4.0, 4.0, 1.0, 1.0)"
  for seed in 1337 1338 1339; do
    joint tokkc4lgx2 tok $seed ${X2/2430/2800} --token_loss=1.0 "$KC4" --length_groups=8 &
    joint slowkc4x2 tok480 $seed ${X2/2430/2200} --token_loss=1.0 "$KC4" &
    joint slowkc4lgx2 tok480 $seed ${X2/2430/2400} --token_loss=1.0 "$KC4" --length_groups=8 &
  done
  ;;
tokens5)
  two_stage1s
  for seed in 1337 1338 1339; do
    joint slowkc8x2 tok480 $seed ${X2/2430/2200} --token_loss=1.0 "--token_weights=(8.0, 8.0, 1.0, 1.0)" &
    joint slowk8x2 tok480 $seed ${X2/2430/2200} --token_loss=1.0 "--token_weights=(8.0, 2.0, 1.0, 1.0)" &
    joint s600kc4x2 tok $seed ${X2/2430/2010} --token_loss=1.0 "--token_weights=(4.0, 4.0, 1.0, 1.0)" &
  done
  ;;
share)
  x2_world
  for steps in 334 468 600; do vision s$steps 128,512,4 $S600 --max_steps=$steps & done
  wait
  for seed in 1337 1338 1339; do
    joint share25x2 s334 $seed ${X2/2430/1150} &
    joint share35x2 s468 $seed ${X2/2430/1000} &
    joint share45x2 s600 $seed ${X2/2430/850} &
  done
  ;;
share2)
  x2_world
  for steps in 200 267; do vision s$steps 128,512,4 $S600 --max_steps=$steps & done
  wait
  for seed in 1337 1338 1339; do
    joint share15x2 s200 $seed ${X2/2430/1300} &
    joint share20x2 s267 $seed ${X2/2430/1225} &
  done
  ;;
wsd)
  x2_world
  vision base 128,512,4 $S600 &
  vision wsd50 128,512,4 $S600 --lr_decay_frac=0.5 &
  vision wsd25 128,512,4 $S600 --lr_decay_frac=0.25 &
  vision mu03 128,512,4 $S600 --muon_lr=0.03 &
  vision sw2 128,512,4 $S600 --scene_weight=2.0 &
  vision wd0 128,512,4 $S600 --weight_decay=0.0 &
  wait
  J=${X2/2430/2550}
  for seed in 1337 1338 1339; do
    joint basex2 base $seed $J &
    joint jwsd30x2 base $seed $J --lr_decay_frac=0.3 &
  done
  for name in wsd50 wsd25 mu03 sw2 wd0; do joint ${name}x2 $name 1337 $J & done
  ;;
wsd2)
  x2_world
  vision wsd25 128,512,4 $S600 --lr_decay_frac=0.25 &
  vision wsd25sw2 128,512,4 $S600 --lr_decay_frac=0.25 --scene_weight=2.0 &
  vision wsd15 128,512,4 $S600 --lr_decay_frac=0.15 &
  wait
  J=${X2/2430/2550}
  for seed in 1337 1338 1339; do
    joint wsd25x2 wsd25 $seed $J &
    joint wsd25sw2x2 wsd25sw2 $seed $J &
  done
  joint wsd15x2 wsd15 1337 $J &
  ;;
margins)
  x2_world
  vision m2 128,512,4 $W &
  ALIGN_ARGS="--overlap_margins=(1,1)" vision m1 128,512,4 $W "--overlap_margins=(1,1)" &
  ALIGN_ARGS="--overlap_margins=(0,0)" vision m0 128,512,4 $W "--overlap_margins=(0,0)" &
  wait
  for seed in 1337 1338 1339; do
    joint m2x2 m2 $seed ${X2/2430/2550} &
    joint m1x2 m1 $seed ${X2/2430/2410} --max_seq_len=464 "--overlap_margins=(1,1)" &
    joint m0x2 m0 $seed ${X2/2430/2375} --max_seq_len=480 "--overlap_margins=(0,0)" &
  done
  ;;
margins2)
  x2_world
  vision m2 128,512,4 $W &
  vision m1at2 128,512,4 $W "--overlap_margins=(1,1)" &  # stage 1 at (1, 1), its align stage at the demo's (2, 2)
  wait
  for seed in 1337 1338 1339; do
    joint m2x2 m2 $seed ${X2/2430/2550} &
    joint m1at2x2 m1at2 $seed ${X2/2430/2550} &
  done
  ;;
world5k)
  x2_world & x2_world 5000 & wait
  vision m2 128,512,4 $W &
  ALIGN_ARGS="--data_dir=data/demo_x2_5000" vision w5 128,512,4 $W --data_dir=data/demo_x2_5000 &
  wait
  for seed in 1337 1338 1339; do
    joint m2x2 m2 $seed ${X2/2430/2550} &
    joint w5x2 w5 $seed ${X2/2430/2550} --data_dir=data/demo_x2_5000 &
    joint w5x2s2850 w5 $seed ${X2/2430/2850} --data_dir=data/demo_x2_5000 &
  done
  ;;
slowcpu|amx2500)
  x2_world 5000 & x2_world 2500 & wait
  if [ $GROUP = slowcpu ]; then S1=360 J=1500 J25=1650; else S1=600 J=2850 J25=3100; fi
  for n in 5000 2500; do
    ALIGN_ARGS="--data_dir=data/demo_x2_$n" vision $GROUP$n 128,512,4 $W --max_steps=$S1 --data_dir=data/demo_x2_$n &
  done
  wait
  for seed in 1337 1338 1339; do
    joint ${GROUP}5k $GROUP'5000' $seed ${X2/2430/$J} --data_dir=data/demo_x2_5000 &
    joint ${GROUP}2500 $GROUP'2500' $seed ${X2/2430/$J} --data_dir=data/demo_x2_2500 &
    joint ${GROUP}2500s$J25 $GROUP'2500' $seed ${X2/2430/$J25} --data_dir=data/demo_x2_2500 &
    [ $GROUP = slowcpu ] && joint ${GROUP}5kmu15 $GROUP'5000' $seed ${X2/2430/$J} --data_dir=data/demo_x2_5000 \
        --muon_lr=0.015 &
  done
  ;;
slowshare)
  x2_world 5000 & x2_world 2500 & wait
  for s1 in 390 500 600; do
    ALIGN_ARGS="--data_dir=data/demo_x2_5000" vision share$s1 128,512,4 $W --max_steps=$s1 \
        --data_dir=data/demo_x2_5000 &
  done
  ALIGN_ARGS="--data_dir=data/demo_x2_2500" vision w2500s390 128,512,4 $W --max_steps=390 --data_dir=data/demo_x2_2500 &
  wait
  for seed in ${SEEDS:-1337 1338 1339}; do
    for spec in share390:1950 share500:1800 share600:1650; do
      joint ${spec%:*}j${spec#*:} ${spec%:*} $seed ${X2/2430/${spec#*:}} --data_dir=data/demo_x2_5000 &
    done
    joint w2500s390j1950 w2500s390 $seed ${X2/2430/1950} --data_dir=data/demo_x2_2500 &
  done
  ;;
*) echo "group: width, levers, rows, vitmuon, vitmuon2, vitmuon3, kinds, crops, queries, bvx2, digits, digits2,"\
        "digits3, steps, tokens, tokens2, tokens3, tokens4, tokens5, share, share2, wsd, wsd2, margins, margins2,"\
        "world5k, slowcpu, amx2500 or slowshare"
   exit 2 ;;
esac
wait
stamp "all done"
