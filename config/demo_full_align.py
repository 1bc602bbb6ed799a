# The full-preset demo's align stage (python demo.py --recipe=full), on top of config/demo_align.py: the nanomolmo2
# preset (Qwen3-0.6B at random, the stage-1 ViT and its 112-px crops, a new connector), the same 40 short steps.
model_preset = "nanomolmo2"
lr_connector = 1e-4  # the joint stage's rate for this connector (config/demo_full_joint.py says why)
save_every = 0  # no resumable checkpoint: with its AdamW state it is ~12 GB to write, for a stage of 40 short steps
