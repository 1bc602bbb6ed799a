# Molmo2's long-context SFT: the SFT mixture (config/mix_sft.py, repeated here because presets are plain
# files) with 36,864-token rows and up to 384 video frames (MOLMO2_SPEC.md sections 6 and 8).
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
max_seq_len = 36864
max_video_frames = 384
