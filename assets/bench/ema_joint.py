"""The joint stage with running averages of its weights kept beside it (an exponential moving average at each of
DECAYS, updated after every optimizer step), each exported next to the run's final/ as out_dir/ema<decay>/final, so
that one run scores its last weights against their averages (a paired comparison: the CPU demo's final pointing
swings by ~0.1-0.2 between runs and within the last hundred steps of one). Not the project's trainer: a wrapper
that patches MuonAdamW.step and export_final for one experiment.

    python assets/bench/ema_joint.py config/demo_joint.py --init_from=out/demo/align --max_minutes=9.11 \\
        --out_dir=/tmp/e_run --resume=False
    python eval.py --init_from=/tmp/e_run/ema0.998 --split=test --data_dir=data/demo \\
        "--datasets=['synth_image']" "--tasks=['counting', 'pointing']" --out_dir=/tmp/e_run/ema0.998/eval
"""

import os
import runpy
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)
import training  # noqa: E402

DECAYS = (0.99, 0.998)  # horizons of ~100 and ~500 steps
averages = {}  # (decay, id(parameter)) -> float32 average
step_alone = training.MuonAdamW.step
export_alone = training.export_final


def step(self, closure=None):
    loss = step_alone(self, closure)
    for group in self.param_groups:
        for p in group["params"]:
            now = p.detach().float()  # once a parameter, not once a decay
            for decay in DECAYS:
                if (decay, id(p)) not in averages:  # the first step starts each average at the weights
                    averages[(decay, id(p))] = now.clone()
                averages[(decay, id(p))].lerp_(now, 1 - decay)
    return loss


def export_final(train_model, model, optimizer, d, final_dir, processor, start):
    export_alone(train_model, model, optimizer, d, final_dir, processor, start)
    params = list(model.parameters())  # the token head, if any, is off by now
    last = [p.detach().clone() for p in params]
    with torch.no_grad():
        for decay in DECAYS:
            for p, kept in zip(params, last):
                average = averages.get((decay, id(p)))
                p.copy_(kept if average is None else average.to(p.dtype))
            export_alone(train_model, model, optimizer, d,
                         os.path.join(os.path.dirname(final_dir), f"ema{decay}", "final"), processor, start)
        for p, kept in zip(params, last):
            p.copy_(kept)


if __name__ == "__main__":
    training.MuonAdamW.step = step
    training.export_final = export_final
    os.chdir(ROOT)
    sys.argv = ["train_joint.py", *sys.argv[1:]]
    runpy.run_path("train_joint.py", run_name="__main__")
