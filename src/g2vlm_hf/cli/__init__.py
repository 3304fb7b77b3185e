"""`g2vlm`: 3D reconstruction and spatial chat from the command line.

    g2vlm reconstruct --model MODEL view1.png view2.png ... --output out/   (or --folder DIR, or --video FILE)
    g2vlm reconstruct --model MODEL views/*.png --output out/ --colmap out/sparse --ask "Which view is closest to the door?"
    g2vlm reconstruct --model MODEL --video walk.mp4 --every 5 --chunk-size 32 --overlap 8 --output out/   (any length)
    g2vlm chat --model MODEL --image room.png "How far is the chair from the door?"

Modules: `parser` (the arguments; standard library only, so the `g2vlm` launcher answers `--help` before torch is
imported), `errors`, `checks` (flags, paths and view counts, before any model work), one module per command
(`reconstruct`, `chat`) and `main` (runs a parsed command, one-line errors). Nothing else in the package imports
this one; it stands on `inputs`, `model_loading`, `reconstruction`, `export` and `safe_output`.
"""

from .main import main

__all__ = ["main"]
