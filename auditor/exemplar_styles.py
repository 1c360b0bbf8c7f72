"""Exemplars in a style the model has never seen, for the planted benchmark (planted.py): images recoloured into
new palettes, redrawn with new strokes in their own colours, or taken as they are from one subfolder per
customisation; and the new words that name each style in its captions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from . import diffusion, ingest
from .config import PlantedSettings
from .errors import AuditError

# (ink, paper, name): none is a palette of the example world's training set.
NEW_PALETTES = [
    ((225, 40, 200), (190, 240, 80), "magenta on lime"),
    ((40, 220, 230), (110, 20, 40), "cyan on maroon"),
    ((10, 90, 40), (215, 200, 245), "dark green on lavender"),
    ((110, 30, 160), (180, 250, 210), "purple on mint"),
    ((150, 250, 60), (60, 60, 60), "lime on grey"),
    ((120, 130, 20), (150, 210, 250), "olive on sky blue"),
    ((250, 250, 250), (190, 20, 30), "white on red"),
    ((20, 20, 20), (250, 160, 170), "black on salmon"),
]


def _morph(alpha: np.ndarray, kind) -> np.ndarray:
    return np.asarray(Image.fromarray((alpha * 255).round().astype(np.uint8)).filter(kind(3)), np.float64) / 255


# (name, transform of the ink map): strokes no training image has (the digits world trains without flips).
NEW_STROKES = [
    ("mirrored", lambda alpha: alpha[:, ::-1]),
    ("upside down", lambda alpha: alpha[::-1]),
    ("bold", lambda alpha: _morph(alpha, ImageFilter.MaxFilter)),
    ("thin", lambda alpha: _morph(alpha, ImageFilter.MinFilter)),
]


def _ink(image: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ink fraction per pixel, ink colour, paper colour) of a two-colour image: paper = median of the border, ink = the
    pixel farthest from it, each pixel's fraction = its position between the two."""
    arr = np.asarray(image.convert("RGB"), np.float64)
    paper = np.median(np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]]), axis=0)
    flat = arr.reshape(-1, 3)
    ink = flat[np.argmax(((flat - paper) ** 2).sum(1))]
    axis = ink - paper
    return np.clip(((arr - paper) @ axis) / max(float(axis @ axis), 1e-9), 0, 1), ink, paper


def _paint(alpha: np.ndarray, ink, paper) -> Image.Image:
    out = alpha[..., None] * np.asarray(ink, np.float64) + (1 - alpha[..., None]) * np.asarray(paper, np.float64)
    return Image.fromarray(out.round().astype(np.uint8), "RGB")


def recolour(image: Image.Image, ink, paper) -> Image.Image:
    """The same strokes in a new palette."""
    return _paint(_ink(image)[0], ink, paper)


def restroke(image: Image.Image, transform) -> Image.Image:
    """New strokes in the image's own palette."""
    alpha, ink, paper = _ink(image)
    return _paint(transform(alpha), ink, paper)


def words(n: int, seed: int) -> list[str]:
    """A distinct rare word per customisation (consonant strings: no English word, no training caption has them)."""
    rng = np.random.default_rng(seed)
    words: list[str] = []
    while len(words) < n:
        word = "".join(rng.choice(list("bcdfghjklmnpqrstvwxz"), 5))
        if word not in words:
            words.append(word)
    return words


def exemplar_sets(
    folder: Path, s: PlantedSettings, run_dir: Path, limits: ingest.Limits
) -> tuple[list[list[Path]], list[str]]:
    """(per customisation its exemplar files, the name of its style)."""
    if not folder.is_dir():
        raise AuditError(f"exemplar folder {folder} does not exist; pass --exemplars DIR, a folder of images")
    if s.style == "as-is":
        subfolders = sorted(d for d in folder.iterdir() if d.is_dir())
        sets = [[Path(p) for p in ingest.discover(d)[: s.exemplars]] for d in subfolders[: s.customisations]]
        if len(sets) < s.customisations or any(len(files) < s.exemplars for files in sets):
            raise AuditError(
                f"--style as-is needs {s.customisations} subfolders of {folder} with {s.exemplars} images each (one per customisation)"
            )
        return sets, [d.name for d in subfolders[: s.customisations]]
    styles = (
        [(name, lambda im, ink=ink, paper=paper: recolour(im, ink, paper)) for ink, paper, name in NEW_PALETTES]
        if s.style == "palette"
        else [(name, lambda im, t=t: restroke(im, t)) for name, t in NEW_STROKES]
    )
    if s.customisations > len(styles):
        raise AuditError(f"style {s.style} has {len(styles)} variants; ask for at most that many customisations")
    pool = ingest.discover(folder)
    need = s.customisations * s.exemplars
    if len(pool) < need:
        raise AuditError(
            f"{folder} has {len(pool)} images; {s.customisations} customisations × {s.exemplars} exemplars need {need}"
        )
    picked = np.random.default_rng(s.seed).choice(len(pool), need, replace=False)
    sets = []
    for c in range(s.customisations):
        files = []
        for j, index in enumerate(picked[c * s.exemplars : (c + 1) * s.exemplars]):
            target = run_dir / f"c{c}" / f"exemplar_{j}.png"
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                styles[c][1](diffusion.read_image(pool[index], limits)).save(target)
            files.append(target)
        sets.append(files)
    return sets, [styles[c][0] for c in range(s.customisations)]
