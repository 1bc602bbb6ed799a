# The synthetic world (python prepare_data.py --dataset=synthetic): shapes with captions,
# QA, counting and pointing; image pairs; videos with counting, pointing and tracking. Offline, the default.
data_dir = "data"
data_mixture = {
    "image": (0.7, ["synth_image"]),
    "multi_image": (0.1, ["synth_multi"]),
    "video": (0.2, ["synth_video"]),
}
