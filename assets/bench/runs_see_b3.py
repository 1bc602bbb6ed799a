# GPU batch 3 (2026-11-28): held-out accuracy against steps (curve=True), 32 rows, two runs per GPU
_b = "--vocab=data --batch_size=32 --max_steps=2000 "
_c = "--vocab=data --batch_size=32 --max_steps=2500 --styles=('point_count','pointing','short_answer','long_caption') "
runs = {
    "b32": _b,
    "b32_wd01": _b + "--weight_decay=0.1",
    "b32_wd0": _b + "--weight_decay=0.0",
    "b32_sqrt_wd01": _b + "--loss_weighting=sqrt --weight_decay=0.1",
    "b32_caption": _c,
    "b32_caption_wd01": _c + "--weight_decay=0.1",
    "b32_caption_sqrt": _c + "--loss_weighting=sqrt",
    "d16": "--vocab=data --max_steps=3000",
}
curve = True
