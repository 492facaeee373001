"""FinTune: financial sentiment (negative / neutral / positive) built to survive production."""

__version__ = "0.1.0"
LABELS: tuple[str, str, str] = ("negative", "neutral", "positive")
