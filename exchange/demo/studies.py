"""The studies `exchange demo --study NAME` can run, and the data each hospital imports for it.

- ``breast-cancer`` (the default): logistic regression on scikit-learn's breast cancer set,
  label ``malignant``, purpose DS (C50).
- ``survival``: a Cox proportional-hazards model (template ``cox_ph``) on flchain from
  scikit-survival (7,874 people, death during follow-up), label ``time`` (days) and event
  column ``event``; purpose GRU. Metric: concordance (Harrell's, on the public reference
  sample), plus the integrated Brier score; each hospital releases both on its hold-out patients
  through its privacy ledger (noised, charged: `federated.eval_stats`).

Each hospital's CSV holds its part of the non-IID split (`federated.data` /
`federated.clinical_data`); the survival outcome columns are imported as numbers of category
"diagnoses", and the node's label column is the time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DemoStudy:
    """What differs between the demo's studies."""

    name: str
    dataset: str
    title: str
    purpose: str
    disease: str | None
    template: str
    task: str
    label: str
    #: survival only: the event column
    event: str | None
    #: the round metric the report and the live view lead with (`ref_<metric>` / `eval_<metric>`)
    metric: str

    def columns(self, features: int | None = None) -> dict[str, list[str]]:
        """Data category -> feature column names (spaces as underscores), in model order; with
        `features`, only the dataset's first `features` columns (a Cox study with fewer
        coefficients needs fewer events at each hospital, `exchange.node.outcomes.min_events`:
        flchain split over 25 hospitals leaves most too few events for all six)."""
        from federated.clinical_data import SURVIVAL_DATASETS, survival_feature_specs
        from federated.data import feature_specs

        specs = (survival_feature_specs(self.dataset) if self.dataset in SURVIVAL_DATASETS
                 else feature_specs(self.dataset))
        if features is not None:
            if not 1 <= features <= len(specs):
                raise ValueError(f"features: between 1 and {len(specs)} for {self.name}, not {features}")
            specs = specs[:features]
        out: dict[str, list[str]] = {}
        for spec in specs:
            out.setdefault(spec.category, []).append(spec.name.replace(" ", "_"))
        return out

    def parts(self, hospitals: Sequence[str]) -> dict[str, Any]:
        """Each hospital's records (`federated.data.HospitalData`) of this study's dataset."""
        from federated.clinical_data import SURVIVAL_DATASETS, load_survival_federated
        from federated.data import load_federated

        loaded = (load_survival_federated(self.dataset, len(hospitals), hospital_ids=hospitals)
                  if self.dataset in SURVIVAL_DATASETS
                  else load_federated(self.dataset, len(hospitals), hospital_ids=hospitals))
        return {p.hospital_id: p for p in loaded}

    def body_fields(self, features: int | None = None) -> dict[str, Any]:
        """The study request's fields that depend on the study (StudyCreate); `features` as in
        `columns`."""
        columns = self.columns(features)
        out: dict[str, Any] = {"title": self.title, "purpose": self.purpose, "disease": self.disease,
                               "data_categories": sorted(columns), "columns": columns,
                               "template": self.template, "task": self.task, "label": self.label}
        if self.event is not None:
            out["event"] = self.event
        return out


STUDIES: dict[str, DemoStudy] = {
    "breast-cancer": DemoStudy(
        name="breast-cancer", dataset="breast_cancer",
        title="Breast cancer: malignancy from fine-needle aspirate features", purpose="DUO:0000007",
        disease="C50", template="logistic_regression", task="binary", label="malignant", event=None,
        metric="accuracy"),
    "survival": DemoStudy(
        name="survival", dataset="flchain",
        title="Survival: mortality from serum free light chains (flchain)", purpose="DUO:0000042",
        disease=None, template="cox_ph", task="survival", label="time", event="event",
        metric="concordance"),
}


def get_study(name: str) -> DemoStudy:
    """The demo study called `name`; a clear error listing the choices otherwise."""
    try:
        return STUDIES[name]
    except KeyError:
        raise ValueError(f"study: unknown demo study {name!r}; choose one of {sorted(STUDIES)}") from None
