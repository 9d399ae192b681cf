"""Demo data: scikit-learn's breast cancer and diabetes sets split across hospitals, non-IID.

Nothing is downloaded: both sets ship inside scikit-learn.

How the split works (and why). First a fixed, stratified 10 % of the rows is set aside as a
PUBLIC reference sample (see `public_reference_rows`): no hospital holds those rows. The rest is
split over hospitals of equal size with different case mixes. Records are grouped into strata
(breast cancer: the diagnosis; diabetes: age tercile at the fixed cut points 45 and 57 years).
Each stratum draws its preference over hospitals from a symmetric Dirichlet(alpha) (fixed seed);
records are dealt in random order, each to a hospital drawn from its stratum's preferences among
the hospitals not yet full. Small alpha gives strong skew (a referral centre sees mostly malignant
cases, a screening clinic mostly benign ones); alpha=1 can leave a hospital with a single class;
alpha=2 (the default) gives malignant shares 0.58 / 0.21 / 0.33 over 137 / 137 / 136 training
records. Equal sizes keep the comparison about case mix: with DP a hospital's noise is set by its
own record count, so a tiny hospital would dominate the error whatever the method. The split is a
pure function of its arguments: every node computes the same split and takes only its own part.

Feature scaling without leaking across hospitals. Standardising with statistics pooled over all
hospitals would need every hospital's raw data; standardising with each hospital's own mean/std
would make the model depend on statistics released without noise (outside the DP guarantee) and
would put the same feature on different scales at different hospitals (poison for FedAvg under
label skew). Instead every feature goes through FIXED transforms that depend on no hospital
record: (1) public bounds to [-1, 1] (breast cancer: the per-feature min/max published in the
dataset's documentation, log scale for heavy-tailed size features; diabetes: clinical reference
ranges), then, by default (`scaling="reference"`), (2) centring and scaling by the mean and
standard deviation of the public reference sample, clipped to +-3. Step (2) matters: features
that all sit around -0.4 on [-1, 1] make noisy SGD badly conditioned (noise-free FedAvg reached
only 0.92-0.93 accuracy in 200 steps; with reference centring 0.98). `scaling="bounds"` keeps
step (1) only. A real deployment would take the reference constants from a published cohort.

Pseudonyms. Each record gets `p_` + the first 32 hex digits of HMAC-SHA256(hospital secret,
"<dataset>:<row index>"): hospital-scoped (the same row at two hospitals would get unrelated
pseudonyms), stable across restarts, and not reversible without the secret. The demo secrets are
derived from the hospital id; a real node uses its own random secret.

Data categories (for column-level consent). Breast cancer: the 10 "mean *" features form the
pathology report and are "labs"; the 20 "* error" and "worst *" features are further quantities
derived from the digitised FNA image and are "imaging". Diabetes: age and sex are "demographics",
bmi and bp are "vitals", s1-s6 (serum measurements) are "labs".
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Literal

import numpy as np

DatasetName = Literal["breast_cancer", "diabetes"]
DATASETS: tuple[str, ...] = ("breast_cancer", "diabetes")
DEFAULT_HOSPITALS: tuple[str, ...] = ("hospital-a", "hospital-b", "hospital-c")


class DataError(ValueError):
    """A data request is not acceptable (unknown dataset, hospital, category, column...)."""


@dataclass(frozen=True)
class FeatureSpec:
    """How one column is scaled with public constants and which data category it belongs to."""

    name: str
    category: str
    lo: float
    hi: float
    log: bool = False

    def scale(self, x: np.ndarray) -> np.ndarray:
        """Map raw values to [-1, 1] with the public bounds; values outside are clipped."""
        lo, hi = self.lo, self.hi
        if self.log:
            x = np.log1p(np.maximum(x, 0.0))
            lo, hi = float(np.log1p(lo)), float(np.log1p(hi))
        return np.clip(2.0 * (x - lo) / (hi - lo) - 1.0, -1.0, 1.0)


# Published min / max per feature from the dataset documentation (load_breast_cancer().DESCR).
_BC_BOUNDS: tuple[tuple[float, float], ...] = (
    (6.981, 28.11), (9.71, 39.28), (43.79, 188.5), (143.5, 2501.0), (0.053, 0.163),
    (0.019, 0.345), (0.0, 0.427), (0.0, 0.201), (0.106, 0.304), (0.05, 0.097),
    (0.112, 2.873), (0.36, 4.885), (0.757, 21.98), (6.802, 542.2), (0.002, 0.031),
    (0.002, 0.135), (0.0, 0.396), (0.0, 0.053), (0.008, 0.079), (0.001, 0.03),
    (7.93, 36.04), (12.02, 49.54), (50.41, 251.2), (185.2, 4254.0), (0.071, 0.223),
    (0.027, 1.058), (0.0, 1.252), (0.0, 0.291), (0.156, 0.664), (0.055, 0.208),
)
# Heavy-tailed size features (area, the error terms of radius/perimeter/area) use a log scale so
# that most records do not crowd into a corner of [-1, 1].
_BC_LOG = {"mean area", "area error", "worst area", "radius error", "perimeter error"}

# Clinical reference ranges for the raw (unscaled) diabetes features; units as in the source.
_DIABETES_SPECS: tuple[FeatureSpec, ...] = (
    FeatureSpec("age", "demographics", 18.0, 90.0),
    FeatureSpec("sex", "demographics", 1.0, 2.0),
    FeatureSpec("bmi", "vitals", 15.0, 50.0),
    FeatureSpec("bp", "vitals", 60.0, 140.0),
    FeatureSpec("s1", "labs", 100.0, 320.0),
    FeatureSpec("s2", "labs", 40.0, 250.0),
    FeatureSpec("s3", "labs", 20.0, 100.0),
    FeatureSpec("s4", "labs", 1.5, 10.0),
    FeatureSpec("s5", "labs", 3.0, 6.5),
    FeatureSpec("s6", "labs", 55.0, 130.0),
)
# Disease progression is documented on 25..346; scaled as (y - 150) / 75 for training.
DIABETES_TARGET_OFFSET = 150.0
DIABETES_TARGET_SCALE = 75.0
_DIABETES_AGE_CUTS = (45.0, 57.0)


def _bc_specs(names: Sequence[str]) -> tuple[FeatureSpec, ...]:
    return tuple(
        FeatureSpec(n, "labs" if n.startswith("mean ") else "imaging", lo, hi, log=n in _BC_LOG)
        for n, (lo, hi) in zip(names, _BC_BOUNDS, strict=True)
    )


def feature_specs(dataset: str) -> tuple[FeatureSpec, ...]:
    """Column names, data categories and public scaling bounds of `dataset`."""
    if dataset == "breast_cancer":
        from sklearn.datasets import load_breast_cancer  # not at import: executors never load data sets

        return _bc_specs([str(n) for n in load_breast_cancer().feature_names])
    if dataset == "diabetes":
        return _DIABETES_SPECS
    raise DataError(f"dataset: unknown dataset {dataset!r}; choose one of {list(DATASETS)}")


def column_categories(dataset: str) -> dict[str, str]:
    """Column name -> data category for `dataset`."""
    return {s.name: s.category for s in feature_specs(dataset)}


@dataclass(frozen=True)
class HospitalData:
    """One hospital's records of one dataset: pseudonyms, scaled features, targets.

    `is_test` marks the hospital's local hold-out records (a fixed, stratified share), used for
    federated evaluation; `train()` and `test()` split on it. All selection methods return new
    objects and never modify this one.
    """

    dataset: str
    hospital_id: str
    task: Literal["binary", "regression", "multiclass", "survival"]
    pseudonyms: tuple[str, ...]
    x: np.ndarray
    y: np.ndarray
    columns: tuple[str, ...]
    categories: Mapping[str, str]
    is_test: np.ndarray
    target_scale: float = 1.0
    target_offset: float = 0.0
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pseudonyms)

    @property
    def n_features(self) -> int:
        return len(self.columns)

    def _take(self, idx: np.ndarray) -> HospitalData:
        return replace(self, pseudonyms=tuple(self.pseudonyms[i] for i in idx), x=self.x[idx],
                       y=self.y[idx], is_test=self.is_test[idx])

    def train(self) -> HospitalData:
        """The records not held out for evaluation."""
        return self._take(np.flatnonzero(~self.is_test))

    def test(self) -> HospitalData:
        """The hospital's local hold-out records."""
        return self._take(np.flatnonzero(self.is_test))

    def select_records(self, pseudonyms: Iterable[str]) -> HospitalData:
        """Only the records whose pseudonym is in `pseudonyms` (e.g. the consent-gated set), in
        this object's order. Unknown pseudonyms are an error: gating must be computed over this
        hospital's own records, and a mismatch means the two disagree."""
        wanted = set(pseudonyms)
        known = set(self.pseudonyms)
        unknown = wanted - known
        if unknown:
            raise DataError(f"pseudonyms: {len(unknown)} not held by {self.hospital_id}")
        return self._take(np.array([i for i, p in enumerate(self.pseudonyms) if p in wanted],
                                   dtype=np.int64))

    def select_columns(self, columns: Sequence[str]) -> HospitalData:
        """Only `columns`, in the order given (the study's column order is the model's input
        order, identical at every hospital)."""
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise DataError(f"columns: unknown columns {missing} for dataset {self.dataset}")
        if len(set(columns)) != len(columns):
            raise DataError("columns: duplicates")
        if not columns:
            raise DataError("columns: at least one column is needed")
        pos = [self.columns.index(c) for c in columns]
        return replace(self, x=self.x[:, pos], columns=tuple(columns),
                       categories={c: self.categories[c] for c in columns})

    def relabel(self, label: str) -> HospitalData:
        """The same records with column `label` as the target: it leaves the feature columns and
        becomes `y` (a node's records carry every mapped column, and each study names the one
        it predicts). Missing values stay NaN; `complete` drops those records."""
        if label not in self.columns:
            raise DataError(f"label: no column {label!r} in dataset {self.dataset}")
        j = self.columns.index(label)
        keep = [i for i in range(len(self.columns)) if i != j]
        columns = tuple(self.columns[i] for i in keep)
        return replace(self, x=self.x[:, keep], y=np.asarray(self.x[:, j], dtype=np.float32).copy(),
                       columns=columns, categories={c: self.categories[c] for c in columns},
                       target_scale=1.0, target_offset=0.0)

    def where(self, keep: np.ndarray) -> HospitalData:
        """Only the records where the boolean mask `keep` is true (this object's order)."""
        mask = np.asarray(keep, dtype=bool).reshape(-1)
        if mask.shape[0] != len(self):
            raise DataError(f"keep: {mask.shape[0]} flags for {len(self)} records")
        return self if bool(mask.all()) else self._take(np.flatnonzero(mask))

    def complete(self, columns: Sequence[str]) -> HospitalData:
        """Only the records whose target and every one of `columns` hold a value (not NaN): a
        study uses a record only when it has everything the study reads."""
        pos = [self.columns.index(c) for c in columns if c in self.columns]
        ok = np.isfinite(np.asarray(self.y, dtype=np.float64))
        if pos:
            ok &= np.isfinite(self.x[:, pos]).all(axis=1)
        if bool(ok.all()):
            return self
        return self._take(np.flatnonzero(ok))

    def select_categories(self, categories: Iterable[str]) -> HospitalData:
        """Only the columns whose data category is in `categories` (dataset column order)."""
        cats = set(categories)
        unknown = cats - set(self.categories.values())
        if unknown:
            raise DataError(f"categories: unknown data categories {sorted(unknown)} for dataset "
                            f"{self.dataset}; known: {sorted(set(self.categories.values()))}")
        return self.select_columns([c for c in self.columns if self.categories[c] in cats])


def target_fits(task: str, y: np.ndarray, classes: int | None = None) -> np.ndarray:
    """Per record, whether its target value `y` can be a `task` study's target: a finite number;
    binary 0 or 1; multi-class an integer 0..classes-1; survival a time >= 0. A record that does
    not fit is not usable by the study, exactly like a record missing a column: it is left out
    inside the hospital, never refused on, because whether ONE record fits is a fact about one
    patient (docs/privacy.md, "Counts")."""
    values = np.asarray(y, dtype=np.float64).reshape(-1)
    ok = np.isfinite(values)
    safe = np.where(ok, values, -1.0)
    if task == "binary":
        ok &= np.isin(safe, (0.0, 1.0))
    elif task == "multiclass":
        ok &= np.equal(np.floor(safe), safe) & (safe >= 0)
        if classes is not None:
            ok &= safe < classes
    elif task == "survival":
        ok &= safe >= 0
    return ok


def target_problem(task: str, label: str, y: np.ndarray, classes: int | None = None) -> str | None:
    """Why `y` (the values of column `label`, no NaN) cannot be the target of a `task` study, or
    None. Binary: 0 or 1; multi-class: integers 0..classes-1; regression: any finite number;
    survival: a time >= 0 (its event column is checked with the study's). No value or count is
    named: the text may leave the hospital as a refusal reason (docs/privacy.md, "Counts")."""
    values = np.asarray(y, dtype=np.float64)
    if not np.isfinite(values).all():
        return f"label {label!r} holds a value that is not a finite number"
    if task == "binary" and not np.isin(values, (0.0, 1.0)).all():
        return f"label {label!r} is not binary (a binary study's label must be 0 or 1 in every record)"
    if task == "multiclass":
        whole = np.equal(np.floor(values), values)
        if not (whole.all() and (values >= 0).all() and (classes is None or (values < classes).all())):
            return (f"label {label!r} is not a class label (a multi-class study's label must be an "
                    f"integer 0..{(classes or 2) - 1} in every record)")
    if task == "survival" and (values < 0).any():
        return f"label {label!r} holds a negative time (a survival study's time must be >= 0)"
    return None


def demo_secret(hospital_id: str) -> bytes:
    """Deterministic per-hospital secret for the demo and tests ONLY (a real node keeps a random
    secret in its key directory)."""
    return hashlib.sha256(b"health-exchange demo pseudonym secret:" + hospital_id.encode()).digest()


def pseudonym(secret: bytes, dataset: str, row: int) -> str:
    """Hospital-scoped pseudonym of a source row (HMAC-SHA256, 128 bits shown)."""
    return "p_" + hmac.new(secret, f"{dataset}:{row}".encode(), hashlib.sha256).hexdigest()[:32]


@lru_cache(maxsize=4)
def _raw(dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[FeatureSpec, ...]]:
    """Bounds-scaled features, training targets (scaled), strata, specs (cached, read-only)."""
    from sklearn.datasets import load_breast_cancer, load_diabetes  # see feature_specs

    specs = feature_specs(dataset)
    if dataset == "breast_cancer":
        bunch = load_breast_cancer()
        x = np.asarray(bunch.data, dtype=np.float64)
        # sklearn codes malignant as 0; the positive class here is malignant.
        y = (np.asarray(bunch.target) == 0).astype(np.float64)
        strata = y.astype(np.int64)
    else:
        bunch = load_diabetes(scaled=False)
        x = np.asarray(bunch.data, dtype=np.float64)
        y = (np.asarray(bunch.target, dtype=np.float64) - DIABETES_TARGET_OFFSET) / DIABETES_TARGET_SCALE
        strata = np.digitize(x[:, 0], _DIABETES_AGE_CUTS).astype(np.int64)
    xs = np.column_stack([s.scale(x[:, j]) for j, s in enumerate(specs)]).astype(np.float32)
    y32 = y.astype(np.float32)
    for arr in (xs, y32, strata):
        arr.setflags(write=False)
    return xs, y32, strata, specs


def _assign(strata: np.ndarray, n_hospitals: int, alpha: float, seed: int,
            min_records: int) -> np.ndarray:
    """Hospital index of every record (see module doc): hospitals of equal size, each stratum
    preferring hospitals by its own Dirichlet(alpha) draw; records are dealt in random order, each
    to a hospital drawn from its stratum's preferences among those not yet full."""
    rng = np.random.default_rng(seed)
    n = len(strata)
    capacity = np.full(n_hospitals, n // n_hospitals, dtype=np.int64)
    capacity[: n % n_hospitals] += 1
    if capacity.min() < min_records:
        raise DataError(f"n_hospitals: {n} records give {int(capacity.min())} per hospital, "
                        f"below min_records={min_records}")
    prefs = {int(s): rng.dirichlet(np.full(n_hospitals, alpha)) for s in np.unique(strata)}
    owner = np.empty(n, dtype=np.int64)
    fill = np.zeros(n_hospitals, dtype=np.int64)
    for i in rng.permutation(n):
        p = prefs[int(strata[i])] * (fill < capacity)
        if p.sum() <= 0:  # preferred hospitals are full: any hospital with room
            p = (fill < capacity).astype(np.float64)
        h = int(rng.choice(n_hospitals, p=p / p.sum()))
        owner[i] = h
        fill[h] += 1
    return owner


PUBLIC_FRACTION = 0.1
_PUBLIC_SEED = 20_251_128
Z_CLIP = 3.0
Scaling = Literal["reference", "bounds"]


def public_reference_rows(dataset: str) -> np.ndarray:
    """Source rows set aside as the PUBLIC reference sample (a stratified 10 %, fixed seed).

    They play the part of a published reference cohort: no hospital holds them, no study trains
    or is evaluated on them, and the centring/scaling constants are computed from them alone, so
    those constants depend on no hospital record and DP-SGD's guarantee covers the pipeline.
    """
    _x, _y, strata, _specs = _raw(dataset)
    rng = np.random.default_rng(_PUBLIC_SEED)
    rows: list[int] = []
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        rows.extend(int(i) for i in rng.choice(idx, size=round(len(idx) * PUBLIC_FRACTION), replace=False))
    return np.array(sorted(rows), dtype=np.int64)


def reference_constants(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature centre and scale (mean and std of the bounds-scaled features over the public
    reference rows)."""
    x, _y, _strata, _specs = _raw(dataset)
    ref = x[public_reference_rows(dataset)].astype(np.float64)
    return ref.mean(0), np.maximum(ref.std(0), 1e-3)


def load_federated(dataset: str = "breast_cancer", n_hospitals: int = 3, *,
                   hospital_ids: Sequence[str] | None = None, alpha: float = 2.0,
                   split_seed: int = 0, test_fraction: float = 0.2, min_records: int = 100,
                   secrets: Mapping[str, bytes] | None = None,
                   scaling: Scaling = "reference") -> list[HospitalData]:
    """`dataset` split over `n_hospitals` hospitals (see module docstring), one object each.

    `secrets` maps hospital id -> pseudonym secret (default: `demo_secret`). Each hospital's
    `is_test` marks a stratified `test_fraction` of its records, drawn with `split_seed`.
    """
    if dataset not in DATASETS:
        raise DataError(f"dataset: unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
    ids = tuple(hospital_ids) if hospital_ids is not None else tuple(
        DEFAULT_HOSPITALS[i] if i < len(DEFAULT_HOSPITALS) else f"hospital-{i}"
        for i in range(n_hospitals))
    if n_hospitals < 1 or len(ids) != n_hospitals or len(set(ids)) != n_hospitals:
        raise DataError(f"hospital_ids: need {n_hospitals} distinct ids, got {list(ids)}")
    if not alpha > 0:
        raise DataError(f"alpha: must be positive, got {alpha}")
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction: must be in [0, 1), got {test_fraction}")
    if scaling not in ("reference", "bounds"):
        raise DataError(f"scaling: must be 'reference' or 'bounds', got {scaling!r}")
    x, y, strata, specs = _raw(dataset)
    if scaling == "reference":
        centre, scale = reference_constants(dataset)
        x = np.clip((x - centre) / scale, -Z_CLIP, Z_CLIP).astype(np.float32)
    public = public_reference_rows(dataset)
    private = np.setdiff1d(np.arange(len(y)), public)
    owner = np.full(len(y), -1, dtype=np.int64)
    owner[private] = _assign(strata[private], n_hospitals, alpha, split_seed, min_records)
    rng = np.random.default_rng(split_seed + 1)
    out: list[HospitalData] = []
    cats = {s.name: s.category for s in specs}
    task: Literal["binary", "regression"] = "binary" if dataset == "breast_cancer" else "regression"
    for h, hid in enumerate(ids):
        rows = np.flatnonzero(owner == h)
        is_test = np.zeros(len(rows), dtype=bool)
        for s in np.unique(strata[rows]):
            pos = np.flatnonzero(strata[rows] == s)
            k = round(len(pos) * test_fraction)
            is_test[rng.choice(pos, size=k, replace=False)] = True
        secret = (secrets or {}).get(hid) or demo_secret(hid)
        out.append(HospitalData(
            dataset=dataset, hospital_id=hid, task=task,
            pseudonyms=tuple(pseudonym(secret, dataset, int(r)) for r in rows),
            x=x[rows], y=y[rows], columns=tuple(s.name for s in specs), categories=dict(cats),
            is_test=is_test,
            target_scale=DIABETES_TARGET_SCALE if dataset == "diabetes" else 1.0,
            target_offset=DIABETES_TARGET_OFFSET if dataset == "diabetes" else 0.0,
            metadata={"alpha": str(alpha), "split_seed": str(split_seed)}))
    return out


def load_hospital(dataset: str, hospital_id: str, n_hospitals: int = 3,
                  **kwargs: object) -> HospitalData:
    """The part of `load_federated(dataset, n_hospitals, **kwargs)` that belongs to
    `hospital_id` (what a node loads from its node config)."""
    parts = load_federated(dataset, n_hospitals, **kwargs)  # type: ignore[arg-type]
    for p in parts:
        if p.hospital_id == hospital_id:
            return p
    raise DataError(f"hospital_id: {hospital_id!r} is not one of {[p.hospital_id for p in parts]}")


def pooled(parts: Sequence[HospitalData]) -> HospitalData:
    """All hospitals' records in one object: the centralized (non-federated) baseline only."""
    if not parts:
        raise DataError("parts: nothing to pool")
    first = parts[0]
    return replace(
        first, hospital_id="pooled",
        pseudonyms=tuple(p for part in parts for p in part.pseudonyms),
        x=np.concatenate([p.x for p in parts]), y=np.concatenate([p.y for p in parts]),
        is_test=np.concatenate([p.is_test for p in parts]))


def _column_key(name: str) -> str:
    return name.replace("_", " ").strip().lower()


PublicPart = Literal["pretrain", "eval", "all"]


def public_reference(columns: Sequence[str], task: str, part: PublicPart = "all"
                     ) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The PUBLIC reference sample (`public_reference_rows`) of the shipped dataset whose
    features include every one of `columns` (spaces and underscores alike, as node exports spell
    them), with those columns in that order, scaled as `load_federated` scales them: (x, y,
    target scale). None when no shipped dataset matches (a real deployment registers its own).

    `part` "pretrain" and "eval" are two fixed, disjoint, stratified halves: the ServerApp
    trains the study's initial model on the first (public pre-training: no privacy cost, a far
    better start for noisy DP-SGD) and scores each round's model on the second
    (`federated.evaluation.reference_metrics`), so the learning curve is out of sample."""
    wanted = [_column_key(c) for c in columns]
    for dataset in DATASETS:
        if task != ("binary" if dataset == "breast_cancer" else "regression"):
            continue
        names = [_column_key(s.name) for s in feature_specs(dataset)]
        if not wanted or not set(wanted) <= set(names):
            continue
        x, y, strata, _specs = _raw(dataset)
        centre, scale = reference_constants(dataset)
        xs = np.clip((x - centre) / scale, -Z_CLIP, Z_CLIP).astype(np.float32)
        rows = public_reference_rows(dataset)
        rows = public_part(rows, strata, part, seed=_PUBLIC_SEED + 1)
        pos = [names.index(c) for c in wanted]
        target_scale = DIABETES_TARGET_SCALE if dataset == "diabetes" else 1.0
        return xs[rows][:, pos], y[rows], target_scale
    return None


def public_part(rows: np.ndarray, strata: np.ndarray, part: str, seed: int) -> np.ndarray:
    """`rows` of a public sample, or one of its two fixed halves (stratified, seeded):
    "pretrain" for the initial model, any other part but "all" for the reference metrics, so
    the model is never scored on the rows it was pre-trained on."""
    if part == "all":
        return rows
    rng = np.random.default_rng(seed)
    first: list[int] = []
    for s in np.unique(strata[rows]):
        members = rng.permutation(rows[strata[rows] == s])
        first.extend(int(r) for r in members[: (len(members) + 1) // 2])
    chosen = np.isin(rows, first)
    return rows[chosen] if part == "pretrain" else rows[~chosen]
