# GPU batch 2 (2026-11-28): the demo's budget (550 steps of 16 rows, kept tokens; 650 with captions, whose rows hold
# fewer images: the same CPU time), four seeds per recipe
_recipes = {
    "demo": "",
    "wd01": "--weight_decay=0.1",
    "sqrt": "--loss_weighting=sqrt",
    "sqrt_wd01": "--loss_weighting=sqrt --weight_decay=0.1",
    "caption": "--styles=('point_count','pointing','short_answer','long_caption')",
}
runs = {f"{name}_s{seed}": f"--vocab=data --max_steps={650 if name == 'caption' else 550} --seed={seed} {args}".strip()
        for name, args in _recipes.items() for seed in (1337, 1, 2, 3)}
