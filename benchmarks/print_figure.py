"""The README's print example: a print downscaled whole, beside a crop of it at full resolution.

    .venv/bin/python benchmarks/print_figure.py print.png docs/print_2048.jpg --crop 600 200 640

The whole image is shrunk to the crop's height and the crop's place is outlined on it, so a reader sees
the composition and, at 1:1, what the top levels painted (and that tile borders left no seams).
"""

from __future__ import annotations

import argparse

from PIL import Image, ImageDraw


def figure(printed: Image.Image, left: int, top: int, side: int, gap: int = 8) -> Image.Image:
    """(whole image at the crop's height, outlined) + gap + (the crop at 1:1), on white."""
    crop = printed.crop((left, top, left + side, top + side))
    scale = side / printed.height
    whole = printed.resize((round(printed.width * scale), side), Image.Resampling.LANCZOS)
    box = [round(v * scale) for v in (left, top, left + side, top + side)]
    ImageDraw.Draw(whole).rectangle(box, outline=(255, 255, 255), width=2)
    out = Image.new("RGB", (whole.width + gap + side, side), (255, 255, 255))
    out.paste(whole, (0, 0))
    out.paste(crop, (whole.width + gap, 0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("image", help="the print (e.g. stylize image ... --size 2048)")
    parser.add_argument("output", help="a .jpg")
    parser.add_argument("--crop", nargs=3, type=int, default=(600, 200, 640), metavar=("LEFT", "TOP", "SIDE"),
                        help="the full-resolution crop, in the print's pixels")
    parser.add_argument("--quality", type=int, default=85)
    args = parser.parse_args()
    printed = Image.open(args.image).convert("RGB")
    figure(printed, *args.crop).save(args.output, quality=args.quality, optimize=True)


if __name__ == "__main__":
    main()
