# Molmo2's SFT mixture (MOLMO2_SPEC.md section 9), groups and shares as in the paper; inside a group datasets
# are drawn in proportion to sqrt(size). Only datasets prepare_data.py can build are listed: Molmo2 also had
# multi-image QA in "demo", CoSyn-400K in "image_academic" and many academic sets; a group with no dataset
# ("video_academic" here) is left out and the other shares scaled up. The shares add up to 1.1, as in
# allenai/molmo2 launch_scripts/sft.py: they are relative rates, normalised by the sampler.
data_dir = "data"
data_mixture = {
    "demo": (0.15, ["pixmo_ama", "pixmo_cap", "pixmo_cap_qa", "molmo2_cap"]),
    "video_academic": (0.20, []),
    "image_academic": (0.25, ["pixmo_docs_charts", "pixmo_docs_tables", "pixmo_docs_diagrams", "pixmo_docs_other"]),
    "tracking": (0.15, ["molmo2_video_track"]),
    "video_pointing": (0.15, ["molmo2_video_point"]),
    "image_pointing": (0.10, ["pixmo_points", "pixmo_count", "cosyn_point"]),
    "text": (0.10, ["tulu"]),
}
max_seq_len = 16384
max_video_frames = 128
