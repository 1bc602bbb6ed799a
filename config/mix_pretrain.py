# Molmo2's pretraining mixture (MOLMO2_SPEC.md section 9): dense captions 60% (PixMo-Cap captions and
# transcripts), pointing 30%, text 10%. Datasets are {data_dir}/{name}/{split}.jsonl from prepare_data.py.
data_dir = "data"
data_mixture = {
    "captions": (0.6, ["pixmo_cap"]),
    "pointing": (0.3, ["pixmo_points", "pixmo_count", "cosyn_point"]),
    "text": (0.1, ["tulu"]),
}
max_seq_len = 2536
