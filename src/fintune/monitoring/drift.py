"""Prediction drift: compare the labels the service predicts now with those the model gave on validation.

**Baseline.** Training writes ``drift_baseline.json`` next to the trained model with
:func:`save_drift_baseline`: the label counts of the model's predictions on the validation split.
:func:`load_drift_baseline` reads it back (a folder or the file itself).

**Rule.** Over the last ``drift_window`` predictions (default 500):

* both distributions are smoothed additively: ``p_i = (c_i + a) / (n + k a)`` for the window and
  ``q_i = (b_i + a) / (N + k a)`` for the baseline, ``a = drift_smoothing`` (default 0.5, a Jeffreys prior),
  ``k`` classes, so a class that is empty on either side gives a finite value;
* the drift value is ``KL(P_current || Q_baseline) = sum_i p_i ln(p_i / q_i)`` in nats: the extra surprise of
  reading today's predictions with the validation-time distribution;
* it is judged only once the window holds ``drift_min_samples`` predictions (default 100). Under no drift
  ``2 n KL`` is about chi-squared with ``k - 1`` degrees of freedom, so with 3 labels
  ``P(KL > t) ~ exp(-n t)``: at n = 10 a KL of 0.15 happens by chance about 1 time in 4 (25.8 % of
  simulated windows, unsmoothed; ``benchmarks/results/breaker_overhead.json``), at n = 100 about 3 times in
  10 million;
* a drift episode starts when KL rises above ``drift_threshold`` (0.15) and ends only when KL falls below
  ``drift_recovery_threshold`` (0.075): hysteresis, so the hooks fire once per episode, not once per request.

Beside KL, every report carries the population stability index ``PSI = sum_i (p_i - q_i) ln(p_i / q_i)``
(the symmetrised KL; 0.1 / 0.25 are the usual "watch" / "act" levels) and the Jensen-Shannon distance
``sqrt(JS)`` with base-2 logs (between 0 and 1), computed on the same smoothed distributions.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from fintune import LABELS
from fintune.config import MonitoringSettings
from fintune.errors import ArtifactError

__all__ = [
    "BASELINE_FILENAME",
    "DriftBaseline",
    "DriftDetector",
    "DriftReport",
    "DriftState",
    "describe",
    "js_distance",
    "kl_divergence",
    "load_drift_baseline",
    "psi",
    "save_drift_baseline",
    "smoothed",
]

log = logging.getLogger(__name__)
BASELINE_FILENAME = "drift_baseline.json"
BASELINE_VERSION = 1


class DriftState(StrEnum):
    """Where the detector stands."""

    NO_BASELINE = "no_baseline"  # nothing to compare with: no detector runs (snapshots only)
    WARMING_UP = "warming_up"
    STABLE = "stable"
    DRIFTED = "drifted"


def smoothed(counts: Sequence[float], alpha: float) -> list[float]:
    """Additively smoothed probabilities: (c_i + alpha) / (n + k alpha)."""
    total = sum(counts) + alpha * len(counts)
    return [(c + alpha) / total for c in counts]


def kl_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """KL(p || q) in nats; p and q must be strictly positive where p is."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def psi(p: Sequence[float], q: Sequence[float]) -> float:
    """Population stability index: sum (p_i - q_i) ln(p_i / q_i), i.e. KL(p||q) + KL(q||p)."""
    return sum((pi - qi) * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def js_distance(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon distance with base-2 logs: sqrt of the JS divergence, between 0 and 1."""
    m = [(pi + qi) / 2 for pi, qi in zip(p, q, strict=True)]
    divergence = (kl_divergence(p, m) + kl_divergence(q, m)) / 2 / math.log(2)
    return math.sqrt(max(divergence, 0.0))


@dataclass(frozen=True)
class DriftBaseline:
    """The label counts of the trained model's validation predictions."""

    labels: tuple[str, ...]
    counts: tuple[int, ...]
    source: str = ""
    created_at: str = ""

    def __post_init__(self) -> None:
        """ArtifactError unless the labels are distinct names and the counts whole, non-negative and not all
        zero: any other baseline would fail every drift judgement (a log of a negative or a zero probability)."""
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise ArtifactError(f"drift baseline: labels must be distinct and at least one, not {list(self.labels)}")
        if not all(isinstance(label, str) for label in self.labels):
            raise ArtifactError(f"drift baseline: labels must be strings, not {list(self.labels)}")
        if len(self.counts) != len(self.labels):
            raise ArtifactError(f"drift baseline: {len(self.counts)} counts for {len(self.labels)} labels")
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in self.counts) or not sum(self.counts):
            raise ArtifactError(
                f"drift baseline: counts must be whole numbers of predictions, not negative and not all zero, "
                f"not {list(self.counts)}"
            )

    @classmethod
    def from_predictions(
        cls, predictions: Iterable[str], labels: Sequence[str], source: str = ""
    ) -> DriftBaseline:
        """Count ``predictions`` over ``labels``; ArtifactError on a label outside ``labels``."""
        tally = Counter(predictions)
        unknown = set(tally) - set(labels)
        if unknown:
            raise ArtifactError(f"drift baseline: predictions hold labels {sorted(unknown)} not in {list(labels)}")
        if not tally:
            raise ArtifactError("drift baseline: no predictions given; pass the validation predictions")
        created = datetime.now(UTC).isoformat(timespec="seconds")
        return cls(tuple(labels), tuple(tally[label] for label in labels), source, created)

    @property
    def total(self) -> int:
        """Number of predictions behind the baseline."""
        return sum(self.counts)

    def probabilities(self, alpha: float = 0.0) -> dict[str, float]:
        """Label -> probability, smoothed with ``alpha``."""
        return dict(zip(self.labels, smoothed(self.counts, alpha), strict=True))

    def to_json(self) -> dict[str, Any]:
        """The file's content."""
        return {
            "version": BASELINE_VERSION,
            "labels": list(self.labels),
            "counts": dict(zip(self.labels, self.counts, strict=True)),
            "total": self.total,
            "probabilities": self.probabilities(),
            "source": self.source,
            "created_at": self.created_at,
        }


def save_drift_baseline(
    model_dir: str | Path, predictions: Iterable[str], labels: Sequence[str], source: str = "validation"
) -> Path:
    """Write ``<model_dir>/drift_baseline.json`` from the model's validation predictions; returns the path."""
    baseline = DriftBaseline.from_predictions(predictions, labels, source)
    path = Path(model_dir) / BASELINE_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(baseline.to_json(), indent=2) + "\n", encoding="utf-8")
    return path


def load_drift_baseline(path: str | Path, labels: Sequence[str] = LABELS) -> DriftBaseline:
    """Read a baseline from a model folder or a ``drift_baseline.json`` path; ArtifactError when it is missing,
    unreadable, holds impossible counts, or counts other labels than ``labels`` (the model's)."""
    path = Path(path)
    if path.is_dir():
        path = path / BASELINE_FILENAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data["labels"], list):
            raise TypeError(f"labels must be a list, not {data['labels']!r}")
        found = tuple(data["labels"])
        counts = tuple(_whole(data["counts"][label]) for label in found)
        baseline = DriftBaseline(found, counts, str(data.get("source", "")), str(data.get("created_at", "")))
    except FileNotFoundError as exc:
        raise ArtifactError(
            f"no drift baseline at {path}: train the model (it writes {BASELINE_FILENAME} next to it)"
        ) from exc
    except ArtifactError as exc:
        reason = str(exc).removeprefix("drift baseline: ")
        raise ArtifactError(f"drift baseline {path} is unusable: {reason}; retrain to rewrite it") from exc
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"drift baseline {path} is unreadable ({exc!r}); retrain to rewrite it") from exc
    if set(baseline.labels) != set(labels):
        raise ArtifactError(
            f"drift baseline {path} counts the labels {list(baseline.labels)}, but the model predicts "
            f"{list(labels)}: drift could never be judged; retrain to rewrite it"
        )
    return baseline


def _whole(value: Any) -> int:
    """A count from the file: an int, or a float with no fraction (JSON writers may add ``.0``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"a count must be a whole number, not {value!r}")
    return value


@dataclass(frozen=True)
class DriftReport:
    """One judgement of the window against the baseline."""

    state: DriftState
    kl: float | None
    psi: float | None
    js_distance: float | None
    window_size: int
    threshold: float
    recovery_threshold: float
    min_samples: int
    current: dict[str, float] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)
    episodes: int = 0

    @property
    def drifted(self) -> bool:
        """Whether a drift episode is under way."""
        return self.state is DriftState.DRIFTED

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = asdict(self)
        out["state"] = self.state.value
        out["drifted"] = self.drifted
        return out


class DriftDetector:
    """Sliding-window KL drift detector with smoothing, a minimum window and hysteresis (thread-safe)."""

    def __init__(self, baseline: DriftBaseline, settings: MonitoringSettings | None = None) -> None:
        """Compare the predictions fed to it with ``baseline``, by the window and threshold of ``settings``."""
        self.baseline = baseline
        self.settings = settings or MonitoringSettings()
        self._index = {label: i for i, label in enumerate(baseline.labels)}
        self._q = smoothed(baseline.counts, self.settings.drift_smoothing)
        self._window: deque[int] = deque()
        self._counts = [0] * len(baseline.labels)
        self._state = DriftState.WARMING_UP
        self._kl: float | None = None
        self._episodes = 0
        self._unknown: set[str] = set()
        self._lock = threading.Lock()

    def update(self, label: str) -> DriftReport | None:
        """Add one prediction; return the report when this prediction starts a drift episode, else None.

        A label that is not in the baseline is ignored (it cannot be compared).
        """
        i = self._index.get(label)
        if i is None:
            if label not in self._unknown:
                self._unknown.add(label)
                log.warning("drift: label %r is not in the baseline %s; ignored", label, list(self._index))
            return None
        with self._lock:
            self._push(i)
            if not self._judge():
                return None
            return self._report()

    def report(self) -> DriftReport:
        """The current judgement with KL, PSI and JS distance."""
        with self._lock:
            return self._report()

    @property
    def state(self) -> DriftState:
        """The current state."""
        return self._state

    @property
    def kl(self) -> float | None:
        """The latest KL(current || baseline), None while warming up."""
        return self._kl

    def _push(self, i: int) -> None:
        """Slide the window by one prediction."""
        self._window.append(i)
        self._counts[i] += 1
        if len(self._window) > self.settings.drift_window:
            self._counts[self._window.popleft()] -= 1

    def _judge(self) -> bool:
        """Update KL and the state; True when a new drift episode starts."""
        s = self.settings
        if len(self._window) < s.drift_min_samples:
            self._kl = None
            return False
        self._kl = kl_divergence(smoothed(self._counts, s.drift_smoothing), self._q)
        if self._state is DriftState.DRIFTED:
            if self._kl < s.drift_recovery_threshold:
                self._state = DriftState.STABLE
            return False
        self._state = DriftState.STABLE
        if self._kl > s.drift_threshold:
            self._state = DriftState.DRIFTED
            self._episodes += 1
            return True
        return False

    def _report(self) -> DriftReport:
        """Build the report from the current window (lock held)."""
        s = self.settings
        p = smoothed(self._counts, s.drift_smoothing)
        judged = len(self._window) >= s.drift_min_samples
        labels = self.baseline.labels
        n = len(self._window)
        return DriftReport(
            state=self._state,
            kl=kl_divergence(p, self._q) if judged else None,
            psi=psi(p, self._q) if judged else None,
            js_distance=js_distance(p, self._q) if judged else None,
            window_size=n,
            threshold=s.drift_threshold,
            recovery_threshold=s.drift_recovery_threshold,
            min_samples=s.drift_min_samples,
            current={label: (c / n if n else 0.0) for label, c in zip(labels, self._counts, strict=True)},
            baseline=self.baseline.probabilities(),
            episodes=self._episodes,
        )


def describe(report: DriftReport | None, settings: MonitoringSettings | None = None) -> Mapping[str, Any]:
    """The JSON form of a report for snapshots; without one (no baseline) the same keys, state ``no_baseline``,
    the thresholds of ``settings`` and nothing measured."""
    if report is not None:
        return report.as_dict()
    s = settings or MonitoringSettings()
    return DriftReport(DriftState.NO_BASELINE, None, None, None, 0, s.drift_threshold, s.drift_recovery_threshold,
                       s.drift_min_samples).as_dict()
