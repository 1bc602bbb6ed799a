# The README demo's joint stage: the small nanoMolmo2 learns counting, pointing and short answers on the demo
# world's single images, on a 2-core CPU in float32 (see demo.py). The ViT arrives from stage 1 already pointing and
# stays frozen here: a CPU step then skips the ViT's backward, and with rows of 256 tokens (one image each, so the
# LLM's attention is 4x smaller) an image costs 20 ms instead of 31 ms. What the LLM needs is updates: replayed on
# GPUs over two seeds, more steps over the same images raised pointing F1 (BENCHMARKS.md, "The CPU demo's levers"),
# and a CPU step's cost is linear in its images (16 a step: 0.33 s; 32: 0.66 s), so the demo takes 16 a step and
# twice the steps: on this machine counting 0.365 and F1 0.216 against 0.315 and 0.204 at 32 x 880.
out_dir = "out/demo/joint"
init_from = "out/demo/align"  # keeps the align stage's ViT and kept-token vocabulary
model_preset = "small"
data_dir = "data/demo"
data_mixture = {"image": (1.0, ["synth_image"])}
styles = ("point_count", "pointing", "short_answer")
max_crops = 4
overlap_margins = (2, 2)
max_seq_len = 256
batch_size = 16
max_steps = 1760
lr_connector, lr_vit, lr_llm = 1e-3, 0.0, 1e-3  # from scratch: far above Molmo2's fine-tuning rates; lr 0 freezes
warmup_connector, warmup_vit, warmup_llm = 50, 50, 50
weight_decay = 0.1
loss_weighting = "none"  # every answer token weighs 1: long point lists are the lesson here (Molmo2's sft weighting
#   gives an answer of n tokens 2/sqrt(n) each: on one H200 "none" counted 0.48 against 0.33)
resid_dropout = 0.0
eval_every = 440
eval_answers = 100  # answered and scored at each validation: answers.png, the learning curve in the report
eval_batches = 2
save_every = 880
log_every = 50
