"""
The README's main job on its embedded default (CPU, no network): train a small Qwen3 from scratch on
one-digit addition written as chat turns, then answer held-out sums with greedy generation.
Takes a few minutes on a 2-core machine.
"""

import random
import time

import torch
import torch.nn.functional as F

from data import get_tokenizer
from model import Qwen3, Qwen3Config, generate

steps, batch_size, lr, seed = 400, 32, 3e-3, 1337

torch.manual_seed(seed)
tok = get_tokenizer()
model = Qwen3(Qwen3Config.preset("tiny"))
rng = random.Random(seed)
held_out = {(a, b) for a in range(10) for b in range(10) if (a * 3 + b) % 7 == 0}


def example(train=True):
    while True:
        a, b = rng.randrange(0, 10), rng.randrange(0, 10)
        if ((a, b) in held_out) != train:
            break
    prompt = tok.encode(tok.chat([{"role": "user", "content": f"{a}+{b}"}]))
    return prompt, tok.encode(f"{a + b}<|im_end|>"), a + b


optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
t0 = time.time()
for step in range(steps + 1):
    rows = [example() for _ in range(batch_size)]
    width = max(len(p) + len(a) for p, a, _ in rows)
    ids = torch.full((batch_size, width), tok.pad_id)  # right-padded: causal attention never sees the padding
    targets = torch.full((batch_size, width), -1)  # -1 = no loss: only the answer is learned
    for i, (p, a, _) in enumerate(rows):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        targets[i, len(p) - 1:len(p) + len(a) - 1] = torch.tensor(a)
    h = model.run_layers(model.embed_tokens(ids))  # (B, T, C)
    where = targets >= 0
    loss = F.cross_entropy(model.lm_logits(h[where]), targets[where])  # logits only where the loss is
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for g in optimizer.param_groups:
        g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.14159)).item()))
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step:4d} | loss {loss.item():.4f} | {time.time() - t0:.0f}s", flush=True)

model.eval()
correct, shown = 0, 0
tests = [example(train=False) for _ in range(100)]
for prompt, _, truth in tests:
    out = generate(model, torch.tensor([prompt]), max_new_tokens=4)
    answer = tok.decode(out[0], skip_special=True)
    correct += answer.strip() == str(truth)
    if shown < 5:
        print(f"  {tok.decode(prompt).split(chr(10))[1].split('<')[0]:>6} = {answer!r} (truth {truth})")
        shown += 1
print(f"held-out sums answered correctly: {correct}/100 after {steps} steps, {time.time() - t0:.0f}s")
