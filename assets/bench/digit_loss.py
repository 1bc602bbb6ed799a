"""Which answer tokens a joint-stage model has learned: its cross-entropy and top-1 accuracy on the validation rows of
the demo world, by what each target token is. Inside a <points coords="..."> list, a number's digits are told apart
by their place (a coordinate's first, second and third digit: its hundreds, tens and units where it has three), and
each number by its role (the image index, a point's index, x, y). A model that knows which cell of the image a shape
is in but not where in it gets the first digit of x and y and guesses the second (at chance: CE ~ln 10 = 2.30, top-1
~0.10); the third, thousandths of the image, is below what the eval's matching asks (a shape's radius, 0.04-0.08).

    python assets/bench/digit_loss.py out/demo/joint [data/demo] [batches]

The rows are those of train_joint.py's validation (the same seed, styles and row length as config/demo_joint.py; the
crops as the checkpoint's processor.json says), in float32 on the CPU.
"""

import collections
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from sample import load_model  # noqa: E402
from training import TrainLoader, batch_to, model_inputs  # noqa: E402

STYLES = ("long_caption", "point_count", "pointing", "short_answer")  # config/demo_joint.py's
ROLES = ("id", "x", "y")  # after the image index, a coords list is (point index, x, y) triples


def token_kind(text_before, piece):
    """What the target token `piece` is, given the answer text before it: 'x digit 1' (the second digit of an x
    coordinate), 'coords other' (spaces, quotes), 'digit outside coords' or 'text'."""
    k = text_before.rfind('coords="')
    inside = k >= 0 and '"' not in text_before[k + 8:]
    if not inside:
        return "digit outside coords" if piece.strip().isdigit() else "text"
    if not piece.strip().isdigit():
        return "coords other"
    numbers = text_before[k + 8:]
    partial = bool(numbers) and not numbers.endswith(" ")  # this digit continues a number
    index = len(numbers.split()) - (1 if partial else 0)  # which number of the list it belongs to
    role = "image" if index == 0 else ROLES[(index - 1) % 3]
    return f"{role} digit {len(numbers.split()[-1]) if partial else 0}"


def main(run_dir, world="data/demo", n_batches=8):
    model, processor, _ = load_model(os.path.join(run_dir, "final"))
    loader = TrainLoader(split="val", data_dir=world, mixture={"image": (1.0, ["synth_image"])}, batch_size=8,
                         max_seq_len=400, max_crops=processor.max_crops, max_row_crops=16, max_video_frames=8,
                         crop_size=model.config.vit.image_size, patch_size=model.config.vit.patch_size,
                         overlap_margins=tuple(processor.overlap_margins), prefix_mode="sft", weighting="none",
                         seed=1337, styles=STYLES)
    tokenizer = processor.tokenizer
    totals = collections.defaultdict(lambda: [0.0, 0, 0])  # kind -> [CE sum, n, right]
    for _ in range(n_batches):
        batch = batch_to(loader.next_step()[0], torch.device("cpu"))
        has_target = batch["targets"] >= 0
        with torch.no_grad():
            logits = model(**model_inputs(batch), logits_positions=has_target).float()  # (N, vocab), row order
        targets = batch["targets"][has_target]
        ce = F.cross_entropy(logits, targets, reduction="none")
        right = logits.argmax(-1) == targets
        i = 0
        for row in range(has_target.shape[0]):
            text = ""  # the row's answer tokens so far (branches follow each other; a coords list never spans two)
            for t in has_target[row].nonzero().flatten().tolist():
                piece = tokenizer.decode([int(batch["targets"][row, t])])
                total = totals[token_kind(text, piece)]
                total[0] += ce[i].item()
                total[1] += 1
                total[2] += int(right[i])
                text += piece
                i += 1
    print(f"{run_dir}: {n_batches} validation batches of 8 rows")
    print(f"{'target token':24s} {'n':>6s} {'CE':>6s} {'top-1':>6s}")
    for kind, (ce_sum, n, n_right) in sorted(totals.items()):
        print(f"{kind:24s} {n:6d} {ce_sum / n:6.3f} {n_right / n:6.3f}")


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:3], *[int(a) for a in sys.argv[3:4]])
