"""What handing a step's tensors from StepsAhead's batch process to the training process costs, alone: a stand-in
loader whose every step is the size of the GPU demo's stage-1 step (128 images: 24 MB of uint8 crops, 2.9 MB of
localisation targets), through the shared slots (the default) and through the socket (a step larger than a slot).
BENCHMARKS.md "Stage 1's step, made and launched" holds what it printed.

    python assets/bench/steps_ahead_transfer.py [--steps=20]
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import torch  # noqa: E402

import training  # noqa: E402
from configurator import configure  # noqa: E402

steps = 20  # timed steps each way, after 3 untimed
configure(globals())


class StandIn:
    """A loader of one fixed step (cloned each time, as a loader makes a new one)."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.batch = {"patches": torch.randint(0, 255, (640, 64, 588), dtype=torch.uint8, generator=generator),
                      "loc_targets": torch.rand(6656, 108, generator=generator)}

    def state_dict(self):
        return {}

    def next_step(self):
        return [{k: v.clone() for k, v in self.batch.items()}]

    def summary(self):
        return ""


for way, slot_bytes in [("shared slots", training.StepsAhead.SLOT_BYTES), ("the socket", 1000)]:
    training.StepsAhead.SLOT_BYTES = slot_bytes
    ahead = training.StepsAhead(StandIn(), process=True)
    for _ in range(3):
        ahead.next_step()
    start = time.time()
    for _ in range(steps):
        got = ahead.next_step()
    print(f"through {way}: {(time.time() - start) / steps * 1e3:.1f} ms a step of 27.5 MB", flush=True)
    assert torch.equal(got[0]["patches"], ahead.loader.batch["patches"])
    ahead.close()
