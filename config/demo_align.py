# The README demo's align stage: a small nanoMolmo2 whose ViT comes from stage 1 (out/demo/vision) and whose LLM
# starts at random; only the connector and the 128 new token embeddings train, on the demo world's counting and
# pointing: a short stage that shows the mechanics on a CPU (see demo.py).
out_dir = "out/demo/align"
init_from = "scratch"
vit_from = "out/demo/vision"
model_preset = "small"
vocab = "data"  # LLM rows only for the world's ~500 tokens: the full 151,936-row head is ~3/4 of a CPU step
data_dir = "data/demo"  # demo.py's world: up to 5 shapes per image, 5,000 training images
data_mixture = {"image": (1.0, ["synth_image"])}
styles = ("point_count", "pointing")
max_crops = 4
overlap_margins = (2, 2)
max_seq_len = 512
batch_size = 4
max_steps = 40
lr_connector = 1e-3
warmup_connector = 10
eval_every = 40
eval_batches = 2
save_every = 40
log_every = 10
position_bins = 32  # the new connector embeds where each image token sits (connector.py says why). On one H200 the
#   GPU demo pointed at F1 0.606 with it against 0.486 without (one run each); on this CPU, 0.435 / 0.188 against
#   0.440 / 0.177 (BENCHMARKS.md "The GPU demo", "The CPU demo")
