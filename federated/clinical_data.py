"""Real clinical time-to-event data for survival studies: flchain and GBSG2 from scikit-survival.

Both sets ship inside the installed scikit-survival wheel (ARFF files in `sksurv/datasets/data`,
read here without importing scikit-survival): nothing is downloaded at run time.

- ``flchain``: 7,874 residents of Olmsted County (Dispenzieri et al. 2012), serum free light
  chains and death during follow-up (27.5 % died). Features: age, sex, kappa, lambda, creatinine,
  MGUS diagnosis. Time: days of follow-up (`futime`), event: death.
- ``gbsg2``: 686 node-positive breast cancer patients of the German Breast Cancer Study Group 2
  trial (Schumacher et al. 1994), recurrence-free survival (43.6 % events). Features: age,
  hormonal therapy, menopausal status, tumour size, grade, positive nodes, progesterone and
  oestrogen receptors. Time: days, event: recurrence or death.

The split follows `federated.data` (same `_assign`, same pseudonyms, same two-step public
scaling; read its docstring for why): a fixed, stratified share of the rows is the PUBLIC
reference sample (it plays a published cohort: 10 % of flchain, 20 % of the much smaller GBSG2);
the rest is dealt to hospitals of equal size with non-IID case mix, strata being age band x
event, each stratum preferring hospitals by a Dirichlet(alpha) draw, so one hospital sees older,
sicker patients than another. Each hospital holds out a stratified 20 % for evaluation.

Hospital records carry the time as the label column (``time``, days, never scaled) and the event
as an ordinary numeric column (``event``, 0/1) next to the features, which is how a node's
records table holds them too: a survival study names both (`StudySpec.label`, `StudySpec.event`)
and never uses them as model inputs. Categories: age and sex are "demographics", the blood
values "labs", MGUS, grade, hormonal therapy and menopausal status "diagnoses", tumour size and
nodes "imaging"/"diagnoses" as pathology; the outcome columns are "diagnoses" (course of the
disease).

The public reference sample's two halves serve the Cox template: "pretrain" is the
SUBCOHORT whose at-risk members form every training patient's risk set (case-cohort design,
docs/survival.md) and the data of the public pre-training; "eval" scores each round's model
exactly (concordance, integrated Brier score) at no privacy cost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from federated.data import (
    DEFAULT_HOSPITALS,
    Z_CLIP,
    DataError,
    FeatureSpec,
    HospitalData,
    _assign,
    demo_secret,
    pseudonym,
    public_part,
)

SURVIVAL_DATASETS: tuple[str, ...] = ("flchain", "gbsg2")
TIME_COLUMN = "time"
EVENT_COLUMN = "event"
OUTCOME_CATEGORY = "diagnoses"
_PUBLIC_SEED = 20_251_205
_PUBLIC_FRACTION = {"flchain": 0.10, "gbsg2": 0.20}

_SPECS: dict[str, tuple[FeatureSpec, ...]] = {
    "flchain": (
        FeatureSpec("age", "demographics", 50.0, 101.0),
        FeatureSpec("sex", "demographics", 0.0, 1.0),
        FeatureSpec("kappa", "labs", 0.01, 20.5, log=True),
        FeatureSpec("lambda", "labs", 0.04, 26.6, log=True),
        FeatureSpec("creatinine", "labs", 0.4, 10.8, log=True),
        FeatureSpec("mgus", "diagnoses", 0.0, 1.0),
    ),
    "gbsg2": (
        FeatureSpec("age", "demographics", 21.0, 80.0),
        FeatureSpec("menostat", "diagnoses", 0.0, 1.0),
        FeatureSpec("hormone_therapy", "medications", 0.0, 1.0),
        FeatureSpec("tumour_size", "imaging", 3.0, 120.0, log=True),
        FeatureSpec("tumour_grade", "diagnoses", 1.0, 3.0),
        FeatureSpec("positive_nodes", "diagnoses", 1.0, 51.0, log=True),
        FeatureSpec("progesterone_receptor", "labs", 0.0, 2380.0, log=True),
        FeatureSpec("oestrogen_receptor", "labs", 0.0, 1144.0, log=True),
    ),
}
# Creatinine is missing for 17 % of flchain; a missing value is imputed with the clinical normal
# (1.0 mg/dL), a constant that depends on no record.
_CREATININE_NORMAL = 1.0
_AGE_CUTS = {"flchain": (60.0, 72.0), "gbsg2": (45.0, 60.0)}


def survival_feature_specs(dataset: str) -> tuple[FeatureSpec, ...]:
    """Feature columns (public bounds and data categories) of a survival dataset."""
    try:
        return _SPECS[dataset]
    except KeyError:
        raise DataError(f"dataset: unknown survival dataset {dataset!r}; "
                        f"choose one of {list(SURVIVAL_DATASETS)}") from None


_ARFF_FILES = {"flchain": "flchain.arff", "gbsg2": "GBSG2.arff"}


def _arff_columns(dataset: str) -> dict[str, list[str]]:
    """The raw values (text; ``?`` for a missing one) of the dataset's ARFF file in the installed
    scikit-survival wheel, by attribute name.

    Read here, not with `sksurv.datasets`: importing any part of scikit-survival imports
    scikit-learn and pandas, which a hospital's Flower process (it reads the public subcohort
    for every survival round) would then hold for its whole life (docs/benchmarks/scale.md,
    "Memory per hospital"). `importlib.util.find_spec` locates the package without importing it.
    tests/federated/test_survival_estimators.py checks the result against `sksurv.datasets`."""
    import csv
    import importlib.util

    spec = importlib.util.find_spec("sksurv")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"dataset: {dataset!r} ships with scikit-survival, which is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / _ARFF_FILES[dataset]
    names: list[str] = []
    rows: list[list[str]] = []
    with path.open(encoding="utf-8", newline="") as handle:
        for line in handle:
            text = line.strip()
            if not text or text.startswith("%"):
                continue
            keyword = text.split(None, 1)[0].lower()
            if keyword == "@attribute":
                names.append(text.split(None, 2)[1].strip("'\""))
            elif keyword == "@data":
                break
        for row in csv.reader(handle, quotechar="'", skipinitialspace=True):
            if not row or row[0].lstrip().startswith("%"):
                continue
            if len(row) != len(names):
                raise DataError(f"dataset: {path.name}: a data row has {len(row)} values for {len(names)} "
                                "attributes")
            rows.append([value.strip() for value in row])
    return {name: [row[i] for row in rows] for i, name in enumerate(names)}


def _numbers(values: list[str], missing: float = np.nan) -> np.ndarray:
    return np.array([missing if v == "?" else float(v) for v in values], dtype=np.float64)


def _flags(values: list[str], true: str) -> np.ndarray:
    return np.array([v == true for v in values], dtype=np.float64)


@lru_cache(maxsize=4)
def _raw(dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bounds-scaled features, time (days), event (0/1) and strata (read-only, cached)."""
    specs = survival_feature_specs(dataset)
    raw = _arff_columns(dataset)
    if dataset == "flchain":
        cols = [_numbers(raw["age"]), _flags(raw["sex"], "M"), _numbers(raw["kappa"]),
                _numbers(raw["lambda"]), _numbers(raw["creatinine"], _CREATININE_NORMAL),
                _flags(raw["mgus"], "yes")]
        time, event = _numbers(raw["futime"]), _flags(raw["death"], "dead")
    else:
        grades = {"I": 1.0, "II": 2.0, "III": 3.0}
        cols = [_numbers(raw["age"]), _flags(raw["menostat"], "Post"), _flags(raw["horTh"], "yes"),
                _numbers(raw["tsize"]), np.array([grades.get(v, np.nan) for v in raw["tgrade"]]),
                _numbers(raw["pnodes"]), _numbers(raw["progrec"]), _numbers(raw["estrec"])]
        time, event = _numbers(raw["time"]), _flags(raw["cens"], "1")
    x = np.column_stack([s.scale(c) for s, c in zip(specs, cols, strict=True)]).astype(np.float32)
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event, dtype=np.float64)
    strata = (np.digitize(cols[0], _AGE_CUTS[dataset]) * 2 + e).astype(np.int64)
    for arr in (x, t, e, strata):
        arr.setflags(write=False)
    return x, t, e, strata


def public_rows(dataset: str) -> np.ndarray:
    """Source rows of the PUBLIC reference sample (stratified, fixed seed)."""
    _x, _t, _e, strata = _raw(dataset)
    rng = np.random.default_rng(_PUBLIC_SEED)
    rows: list[int] = []
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        rows.extend(int(i) for i in rng.choice(idx, size=round(len(idx) * _PUBLIC_FRACTION[dataset]),
                                               replace=False))
    return np.array(sorted(rows), dtype=np.int64)


def _scaled(dataset: str) -> np.ndarray:
    """Features centred and scaled with the public reference sample's mean and std, clipped."""
    x, _t, _e, _s = _raw(dataset)
    ref = x[public_rows(dataset)].astype(np.float64)
    centre, scale = ref.mean(0), np.maximum(ref.std(0), 1e-3)
    return np.clip((x - centre) / scale, -Z_CLIP, Z_CLIP).astype(np.float32)


def load_survival_federated(dataset: str = "flchain", n_hospitals: int = 3, *,
                            hospital_ids: Sequence[str] | None = None, alpha: float = 2.0,
                            split_seed: int = 0, test_fraction: float = 0.2,
                            secrets: Mapping[str, bytes] | None = None) -> list[HospitalData]:
    """`dataset` split over hospitals (module docstring): columns are the features, then
    ``event``; the label (`HospitalData.y`) is the time in days."""
    specs = survival_feature_specs(dataset)
    ids = tuple(hospital_ids) if hospital_ids is not None else tuple(
        DEFAULT_HOSPITALS[i] if i < len(DEFAULT_HOSPITALS) else f"hospital-{i}" for i in range(n_hospitals))
    if n_hospitals < 1 or len(ids) != n_hospitals or len(set(ids)) != n_hospitals:
        raise DataError(f"hospital_ids: need {n_hospitals} distinct ids, got {list(ids)}")
    if not alpha > 0:
        raise DataError(f"alpha: must be positive, got {alpha}")
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction: must be in [0, 1), got {test_fraction}")
    _x, t, e, strata = _raw(dataset)
    x = _scaled(dataset)
    public = public_rows(dataset)
    private = np.setdiff1d(np.arange(len(t)), public)
    owner = np.full(len(t), -1, dtype=np.int64)
    owner[private] = _assign(strata[private], n_hospitals, alpha, split_seed, min_records=50)
    rng = np.random.default_rng(split_seed + 1)
    columns = (*(s.name for s in specs), EVENT_COLUMN)
    cats = {**{s.name: s.category for s in specs}, EVENT_COLUMN: OUTCOME_CATEGORY}
    out: list[HospitalData] = []
    for h, hid in enumerate(ids):
        rows = np.flatnonzero(owner == h)
        is_test = np.zeros(len(rows), dtype=bool)
        for s in np.unique(strata[rows]):
            pos = np.flatnonzero(strata[rows] == s)
            is_test[rng.choice(pos, size=round(len(pos) * test_fraction), replace=False)] = True
        secret = (secrets or {}).get(hid) or demo_secret(hid)
        out.append(HospitalData(
            dataset=dataset, hospital_id=hid, task="survival",
            pseudonyms=tuple(pseudonym(secret, dataset, int(r)) for r in rows),
            x=np.column_stack([x[rows], e[rows]]).astype(np.float32), y=t[rows].astype(np.float32),
            columns=columns, categories=dict(cats), is_test=is_test,
            metadata={"alpha": str(alpha), "split_seed": str(split_seed)}))
    return out


@dataclass(frozen=True)
class SurvivalSet:
    """Features, times and events of a set of patients (a public reference half, a test set)."""

    x: np.ndarray
    time: np.ndarray
    event: np.ndarray

    def __len__(self) -> int:
        return int(self.time.shape[0])


def split_outcome(data: HospitalData, columns: Sequence[str]) -> SurvivalSet:
    """The model inputs `columns`, the time (label) and the ``event`` column of `data`."""
    return SurvivalSet(x=data.select_columns(columns).x, time=np.asarray(data.y, dtype=np.float64),
                       event=data.select_columns([EVENT_COLUMN]).x[:, 0].astype(np.float64))


PublicPart = Literal["pretrain", "eval", "all"]


def public_survival_reference(columns: Sequence[str], part: PublicPart = "all") -> SurvivalSet | None:
    """The PUBLIC reference sample of the shipped survival dataset whose features include every
    one of `columns` (underscores and spaces alike), those columns in order, scaled as the
    hospitals' records are; None when no shipped dataset matches. The halves "pretrain"
    (subcohort and pre-training) and "eval" are fixed, disjoint and stratified."""
    wanted = [c.replace(" ", "_").lower() for c in columns]
    for dataset in SURVIVAL_DATASETS:
        names = [s.name for s in survival_feature_specs(dataset)]
        if not wanted or not set(wanted) <= set(names):
            continue
        _x, t, e, strata = _raw(dataset)
        x = _scaled(dataset)
        rows = public_rows(dataset)
        rows = public_part(rows, strata, part, seed=_PUBLIC_SEED + 1)
        pos = [names.index(c) for c in wanted]
        return SurvivalSet(x=x[rows][:, pos], time=t[rows].copy(), event=e[rows].copy())
    return None


def age_band_dataset() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """flchain as a three-class problem: age band (< 60, 60-71, >= 72 years) from sex, the
    free light chains, creatinine and MGUS, scaled like the survival split: (x, class index
    0..2, feature names). For the multi-class template's tests (tumour grade on GBSG2 was tried
    first: even a non-private fit barely beats the majority class there)."""
    specs = survival_feature_specs("flchain")
    x = _scaled("flchain")
    _x, _t, _e, strata = _raw("flchain")
    return x[:, 1:], (strata // 2).astype(np.int64), tuple(s.name for s in specs[1:])
