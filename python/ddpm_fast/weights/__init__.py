"""Models shipped inside the package.

``ddpm-digits/``: a small DDPM (1 channel, 16×16) trained with ``ddpm-fast train --data digits`` on
scikit-learn's handwritten digits; the default model of ``ddpm-fast sample``. How it was trained: docs/training.md.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_MODEL = "ddpm-digits"


def shipped_model_path() -> str:
    """Path of the shipped ``ddpm-digits`` pipeline folder (diffusers layout)."""
    path = Path(__file__).resolve().parent / SHIPPED_MODEL
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the shipped model is missing from {path} (broken install?); pass --model PATH instead"
        )
    return str(path)
