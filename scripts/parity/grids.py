#!/usr/bin/env python3
"""Both trainers' sample grids side by side, one row per seed.

    scripts/parity/grids.py RUNS STEPS OUT.png SEED...

RUNS is the folder `swd_seeds.sh` wrote (ours-STEPS-SEED/samples.png and
torch-STEPS-SEED/samples.png: 8x8 grids of 32x32 samples; ours has a
2-pixel border between samples, PyTorch's none). Grids are pasted at their
own size, pixel for pixel; the left column is PyTorch's reference
trainer, the right gancluster. Needs Pillow.
"""

import sys
from pathlib import Path

from PIL import Image, ImageDraw

runs, steps, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
seeds = sys.argv[4:]
side, gap, header = 274, 8, 20
sheet = Image.new("RGB", (2 * side + 3 * gap + 60, len(seeds) * (side + gap) + gap + header), "white")
draw = ImageDraw.Draw(sheet)
draw.text((60 + gap, 4), f"PyTorch reference, {steps} steps", fill="black")
draw.text((60 + 2 * gap + side, 4), f"gancluster, {steps} steps", fill="black")
for row, seed in enumerate(seeds):
    y = header + gap + row * (side + gap)
    draw.text((4, y + side // 2), f"seed {seed}", fill="black")
    for col, trainer in enumerate(["torch", "ours"]):
        grid = Image.open(runs / f"{trainer}-{steps}-{seed}" / "samples.png").convert("RGB")
        offset = (side - grid.width) // 2
        sheet.paste(grid, (60 + gap + col * (side + gap) + offset, y + offset))
# A 256-colour palette keeps the picture small enough for the repository.
sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
