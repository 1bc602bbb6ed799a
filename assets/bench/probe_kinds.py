"""Where the kinds of shape get lost: a linear probe of what a trained model's image tokens hold, at two places. For
the tokens whose cell holds a shape's centre (stage 1's scene targets), one multinomial logistic regression is fitted
per attribute (kind, colour) on the tokens of some training images and scored on the validation images', from
- the ViT's features as the connector reads them (its blocks config.connector.vit_layers, concatenated), mean-pooled
  over each token's window: what stage 1's scene head read;
- the connector's output, one vector per token: what the LLM receives.
If the first names the kinds and the second does not, the connector loses them; if both do, the LLM has them and
has not learned to use them (BENCHMARKS.md "Stage 1 at 128 images a step").

    python assets/bench/probe_kinds.py --init_from=out/demo/joint --data_dir=data/demo
    python assets/bench/probe_kinds.py --init_from=out/demo_full/joint --data_dir=data/demo_gpu --device=cuda
"""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from configurator import configure  # noqa: E402
from sample import load_model  # noqa: E402
from training import VisionLoader, scene_attributes, vision_batch_to  # noqa: E402
from vision import window_means  # noqa: E402

init_from = "out/demo/joint"  # a trained model (a stage's out_dir or its final/)
data_dir = "data/demo"
fit_images = 1024  # training images whose tokens the probes are fitted on
test_images = 256  # validation images they are scored on
batch_size = 64
steps = 300  # full-batch L-BFGS iterations of each probe
device = "auto"  # where the model makes the features (the full preset's ViT wants a GPU): auto | cpu | cuda; the
#   probes are fitted on the CPU, in float32, either way
seed = 0
configure(globals())


@torch.no_grad()
def token_features(model, processor, split, n_images, dev):
    """-> {place: (M, C) float32} and (M, n_attributes) scene targets, over the first n_images of split."""
    loader = VisionLoader(data_dir=data_dir, mixture={"image": (1.0, ["synth_image"])}, split=split,
                          batch_size=batch_size, processor=processor, text_max_len=8, use_sigmoid=False, use_loc=False,
                          seed=seed, use_scene=True)
    feats, targets, seen = {"ViT, pooled": [], "connector output": []}, [], 0
    while seen < n_images:
        batch = vision_batch_to(loader.next_step()[0], dev)
        crops, pooling = batch["patches"], batch["pooling"]
        vit = model.vit(crops.reshape(-1, *crops.shape[-2:]), model.config.connector.vit_layers)
        kept = (pooling >= 0).any(-1)  # the connector makes no token of an all-padding window
        feats["ViT, pooled"].append(window_means(vit, pooling[kept]))
        feats["connector output"].append(model.connector(vit, pooling))
        targets.append(batch["scene_targets"][kept])
        seen += int(batch["token_image"].max()) + 1
    return {k: torch.cat(v).float().cpu() for k, v in feats.items()}, torch.cat(targets).cpu()


def probe_accuracy(x_fit, y_fit, x_test, y_test, n_classes):
    """A multinomial logistic regression on standardised features (a little L2), fitted by L-BFGS -> test accuracy."""
    mean, std = x_fit.mean(0), x_fit.std(0).clamp(min=1e-6)
    x_fit, x_test = (x_fit - mean) / std, (x_test - mean) / std
    w = torch.zeros(x_fit.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x_fit @ w + b, y_fit) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((x_test @ w + b).argmax(1) == y_test).float().mean())


def main():
    torch.manual_seed(seed)
    if device not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"probe_kinds: device={device!r}: expected auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("probe_kinds: device='cuda', and this machine has no CUDA GPU")
    dev = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    model, processor, path = load_model(init_from, dev)
    fit, fit_targets = token_features(model, processor, "train", fit_images, dev)
    test, test_targets = token_features(model, processor, "val", test_images, dev)
    print(f"model {path} | probes fitted on the tokens of {fit_images} training images, scored on {test_images} "
          "validation images' (tokens that hold a shape's centre)")
    for a, (attribute, values) in enumerate(scene_attributes().items()):
        fit_rows, test_rows = fit_targets[:, a] > 0, test_targets[:, a] > 0  # 0: no centre; -1: no scene
        line = f"{attribute} ({len(values)} values, {int(test_rows.sum())} test tokens)"
        for place in fit:
            acc = probe_accuracy(fit[place][fit_rows], fit_targets[fit_rows, a] - 1, test[place][test_rows],
                                 test_targets[test_rows, a] - 1, len(values))
            line += f" | {place} {acc:.3f}"
        print(line)


if __name__ == "__main__":
    main()
