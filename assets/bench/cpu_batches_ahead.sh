#!/usr/bin/env bash
# Does making the next batches beside the CPU joint step help on a 2-core CPU? train_joint.py makes them ahead only
# on a GPU (training.StepsAhead); this runs a copy of it with StepsAhead on the CPU too (a thread, or a forked
# process), against the script as it is, before and after: 260 joint steps each from the CPU demo's align
# checkpoint, the same batches. Run in a clone where `make demo` has run (data/demo, out/demo/align); prints the
# logged step times (ms, every 20 steps from step 40) and each run's summary. BENCHMARKS.md "The CPU demo's reserve
# scaled to the CPU; batches made ahead on a CPU".
#   bash assets/bench/cpu_batches_ahead.sh
set -e
sed -e 's/^if d.device.type == "cuda":  # the host makes/if d.device.type == "cuda" or os.environ.get("AHEAD"):  # makes/' \
    -e 's/StepsAhead(loader, pin_device=d.device,/StepsAhead(loader, pin_device=d.device if d.device.type == "cuda" else None,/' \
    train_joint.py > /tmp/train_joint_ahead.py
grep -q 'os.environ.get("AHEAD")' /tmp/train_joint_ahead.py || { echo "train_joint.py changed: the patch did not apply"; exit 1; }
common="config/demo_joint.py --data_dir=data/demo --init_from=out/demo/align --max_steps=260 --eval_every=0
  --eval_answers=0 --save_every=0 --log_every=20"
for v in off thread process off; do
  case $v in off) env=(); extra="";; thread) env=(AHEAD=1); extra="--batch_process=False";;
    process) env=(AHEAD=1); extra="--batch_process=True";; esac
  env "${env[@]}" PYTHONPATH=. .venv/bin/python /tmp/train_joint_ahead.py $common $extra --out_dir=/tmp/ahead_$v \
    > /tmp/ahead_$v.log 2>&1
  echo "$v: $(grep '^step' /tmp/ahead_$v.log | awk -F'|' 'NR>2{print $(NF-1)}' | tr -d ' ms' | tr '\n' ',')" \
    "$(grep '^done' /tmp/ahead_$v.log)"
done
