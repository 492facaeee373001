"""`fintune data` and `fintune baselines`: look at the data, and measure the floor the model must beat.

scikit-learn and matplotlib (``fintune.baselines``) are imported inside `baselines`, so `fintune --help` and
`fintune data` do not pay for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from tqdm import tqdm

from fintune import LABELS
from fintune.cli._app import ProfileOption, app, console, output_folder
from fintune.config import load_settings
from fintune.data import SUBSET_FILES, check_subset, load_splits
from fintune.provenance import command_line


@app.command("data")
def data_command(
    subset: Annotated[
        str, typer.Option(help="One of 50agree, 66agree, 75agree, allagree, or 'all' for every subset.")
    ] = "all",
    profile: ProfileOption = None,
) -> None:
    """Check that Financial PhraseBank is readable; print sentences per label, split sizes and fingerprints."""
    settings = load_settings(profile)
    names = list(SUBSET_FILES) if subset.strip().lower() == "all" else [check_subset(subset)]
    table = Table(title="Financial PhraseBank (unique sentences)")
    for column in ("subset", "sentences", *LABELS, "train/val/test", "fingerprint"):
        table.add_column(column, justify="left" if column in ("subset", "fingerprint") else "right")
    source = ""
    for name in names:
        summary = load_splits(settings, name).describe()
        source = summary["source"]
        totals = {label: sum(counts[label] for counts in summary["label_counts"].values()) for label in LABELS}
        sizes = summary["sizes"]
        table.add_row(
            name, str(sum(sizes.values())), *(str(totals[label]) for label in LABELS),
            f"{sizes['train']}/{sizes['validation']}/{sizes['test']}", summary["fingerprint"][:16],
        )
    console.print(table)
    console.print(f"source: {Path(source).parent if '!' not in source else source}")


@app.command("baselines")
def baselines_command(
    subset: Annotated[str | None, typer.Option(help="Agreement level (default: the profile's, 50agree).")] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option("--output-dir", "-o", help="Where to write (default: <output_dir>/baselines/<subset>/; "
                     "output_dir: outputs/ or FINTUNE_OUTPUT_DIR)."),
    ] = None,
    profile: ProfileOption = None,
) -> None:
    """Train TF-IDF + LogisticRegression / RandomForest / LinearSVC and write comparison.json, reports and plots."""
    from fintune.baselines import run_baselines

    settings = load_settings(profile)
    splits = load_splits(settings, None if subset is None else check_subset(subset))
    target = output_folder(output_dir or settings.output_dir / "baselines" / splits.subset)
    console.print(
        f"baselines on {splits.subset}: {len(splits.train)} train / {len(splits.test)} test sentences "
        f"(fingerprint {splits.fingerprint[:16]})"
    )
    comparison = run_baselines(
        splits, settings.baselines, target, command=command_line(),
        progress=lambda names: tqdm(names, desc="baselines", unit="model"),
    )
    console.print(comparison_table(comparison))
    console.print(f"written to {target}/ (comparison.json, *_report.json, *_confusion.png, *.joblib)")


def comparison_table(comparison: dict[str, Any]) -> Table:
    """The baseline comparison as a terminal table, best macro-F1 marked."""
    table = Table(title=f"TF-IDF baselines, {comparison['data']['subset']} test split")
    for column in ("model", "accuracy", "macro-F1", "fit s", "p50 ms", "p95 ms", "sentences/s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, result in comparison["models"].items():
        marker = " *" if name == comparison["best_by_macro_f1"] else ""
        table.add_row(
            name + marker, f"{result['accuracy']:.3f}", f"{result['macro_f1']:.3f}", f"{result['fit_seconds']:.2f}",
            f"{result['latency_p50_ms']:.2f}", f"{result['latency_p95_ms']:.2f}", f"{result['throughput_per_s']:,.0f}",
        )
    return table
