# GPU batch 1 (2026-11-28): what makes the small model learn to see sooner, on the demo world
_k = "--vocab=data "
_b = _k + "--batch_size=32 --max_steps=1500 "
runs = {
    "d16": _k + "--max_steps=2500",
    "d16_sincos": _k + "--max_steps=2500 --vit_positions=sincos",  # (a knob of commit 125ce74 only)
    "b32": _b,
    "b32_seed7": _b + "--seed=7",
    "b32_wd0": _b + "--weight_decay=0.0",
    "b32_wd01": _b + "--weight_decay=0.1",
    "b32_sincos": _b + "--vit_positions=sincos",
    "b32_wnone": _b + "--loss_weighting=none",
    "b32_wsqrt": _b + "--loss_weighting=sqrt",
    "b32_sincos_wnone": _b + "--vit_positions=sincos --loss_weighting=none",
    "b32_llm2e3": _b + "--lr_llm=2e-3",
    "b32_lr2e3": _b + "--lr_llm=2e-3 --lr_vit=2e-3 --lr_connector=2e-3",
    "b32_vit5e4": _b + "--lr_vit=5e-4",
    "b32_warm200": _b + "--warmup_vit=200 --warmup_connector=200 --warmup_llm=200",
    "b32_caption": _b + "--styles=('point_count','pointing','short_answer','long_caption')",
    "b64": _k + "--batch_size=64 --max_steps=750",
}
