"""The study's Flower app bundle directory (only `pyproject.toml` matters; see docs/flower.md)."""

from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
