"""Import FHIR Consent resources (R4 and R5 JSON) into contracts, or refuse with every reason.

Parsing and structural validation is fhir.resources' (8.x: `fhir.resources.R4B.consent` for R4 —
the Consent resource did not change between R4 and R4B — and `fhir.resources.consent` for R5).
The mapping (docs/consent.md has the full table) is deliberately narrow: whatever could change the
meaning of the consent and has no faithful equivalent in a contract is refused with its FHIR path
and reason; nothing is silently dropped. Informative elements (narrative, identifiers, category,
who signed, verification, the scanned source) carry no rules and are not mapped.

Semantics: R4 `provision.type` maps 1:1 (nested provisions are exceptions). R5 has no
`provision.type`: `Consent.decision` is the base and each level of `provision` is an exception
to the level above, so top-level provisions take the opposite of `decision`, their children the
opposite again. A consent whose status is not `active` imports as a contract that permits nothing.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from typing import Any, Literal

from pydantic import ValidationError

from consent import duo
from consent.codes import ICD10_SYSTEM, CodeError, normalize_icd10
from consent.model import Contract, Period, Provision

FhirVersion = Literal["R4", "R5"]

V3_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
V3_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
CONSENT_ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
CATEGORY_SYSTEM = "urn:health-exchange:data-category"

#: v3 PurposeOfUse codes with a faithful DUO equivalent; every other one is refused.
V3_PURPOSES = {"HRESCH": duo.HMB, "BIORCH": duo.HMB}
#: Actor roles meaning "the recipient of the data"; other roles are refused.
RECIPIENT_ROLES = {"PRCP", "IRCP"}
#: FHIR resource types that are one of our data categories (Observation is ambiguous: use `code`).
RESOURCE_CATEGORIES = {
    "Patient": "demographics",
    "Condition": "diagnoses",
    "Procedure": "procedures",
    "MedicationRequest": "medications",
    "MedicationStatement": "medications",
    "MedicationAdministration": "medications",
    "MedicationDispense": "medications",
    "ImagingStudy": "imaging",
    "MolecularSequence": "genomics",
    "DocumentReference": "notes",
}
OBSERVATION_CATEGORIES = {"laboratory": "labs", "vital-signs": "vitals", "imaging": "imaging"}
USE_ACTIONS = {"use", "access"}
SCOPES = {"research", "patient-privacy"}


class FhirImportError(ValueError):
    """A Consent that cannot be mapped faithfully; `reasons` lists every problem with its FHIR path."""

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = reasons
        super().__init__("; ".join(reasons))


def detect_version(data: dict[str, Any]) -> FhirVersion:
    """R5 when `provision` is a list or R5-only elements appear; R4 when it is an object or R4-only ones."""
    provision = data.get("provision")
    if isinstance(provision, list):
        return "R5"
    if isinstance(provision, dict):
        return "R4"
    r5 = {
        "decision",
        "subject",
        "date",
        "controller",
        "grantor",
        "grantee",
        "manager",
        "policyBasis",
        "regulatoryBasis",
        "policyText",
    }
    return "R5" if r5 & data.keys() else "R4"


def _ref_id(reference: Any, kind: str) -> str | None:
    text = getattr(reference, "reference", None) if reference is not None else None
    if not text or not text.startswith(f"{kind}/") or "/" in text[len(kind) + 1 :]:
        return None
    return str(text[len(kind) + 1 :])


def _instant(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo is not None else None
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    return None


def _period(value: Any, path: str, errors: list[str]) -> Period | None:
    if value is None:
        return None
    start, end = _instant(value.start), _instant(value.end)
    if (value.start is not None and start is None) or (value.end is not None and end is None):
        errors.append(f"{path}: needs full dates or date-times with a time zone")
        return None
    try:
        return Period(start=start, end=end)
    except ValidationError as exc:
        errors.append(f"{path}: {exc.errors()[0]['msg']}")
        return None


def _codings(concepts: list[Any] | None) -> list[Any]:
    out: list[Any] = []
    for concept in concepts or []:
        out.extend(concept.coding or [])
        if not concept.coding:
            out.append(None)
    return out


class _Mapper:
    def __init__(self, version: FhirVersion) -> None:
        self.version = version
        self.errors: list[str] = []

    def refuse(self, path: str, why: str) -> None:
        self.errors.append(f"{path}: {why}")

    def unmapped(self, obj: Any, path: str, names: dict[str, str]) -> None:
        for name, why in names.items():
            if getattr(obj, name, None):
                self.refuse(f"{path}.{name}", f"not mapped: {why}")

    def provision(self, node: Any, path: str, type_: str) -> Provision | None:
        self.unmapped(
            node,
            path,
            {
                "dataPeriod": "a period of the data itself (not of the use) has no contract equivalent",
                "data": "rules about specific resource instances cannot be evaluated per study",
                "securityLabel": "security labels are not carried by records here",
                "expression": "computable expressions are not evaluated",
                "documentType": "document types are not data categories",
                "extension": "extensions are not interpreted",
                "modifierExtension": "a modifier extension changes the meaning and is not understood",
            },
        )
        fields: dict[str, Any] = {"type": type_}
        fields["period"] = _period(node.period, f"{path}.period", self.errors)
        orgs: list[str] = []
        for i, actor in enumerate(node.actor or []):
            apath = f"{path}.actor[{i}]"
            org = _ref_id(actor.reference, "Organization")
            if org is None:
                self.refuse(
                    f"{apath}.reference", "only a reference Organization/<id> is mapped (an organisation)"
                )
            else:
                orgs.append(org)
            for coding in _codings([actor.role] if actor.role is not None else []):
                if coding is None or coding.system != V3_PARTICIPATION or coding.code not in RECIPIENT_ROLES:
                    code = "text only" if coding is None else f"{coding.system}#{coding.code}"
                    self.refuse(
                        f"{apath}.role",
                        f"role {code} is not a data recipient role "
                        f"({', '.join(sorted(RECIPIENT_ROLES))} of v3-ParticipationType)",
                    )
        fields["organisations"] = tuple(orgs)
        actions = set()
        for coding in _codings(node.action):
            if coding is None or coding.system != CONSENT_ACTION:
                self.refuse(f"{path}.action", "only consentaction codes are mapped")
            else:
                actions.add(coding.code)
        if node.action and not actions & USE_ACTIONS:
            self.refuse(
                f"{path}.action",
                f"actions {sorted(actions)} do not govern use or access of the data, "
                "which is all a contract governs",
            )
        purposes: list[str] = []
        modifiers: list[str] = []
        for i, coding in enumerate(node.purpose or []):
            ppath = f"{path}.purpose[{i}]"
            if coding.system == duo.DUO_SYSTEM:
                try:
                    term = duo.normalize(coding.code or "")
                except duo.UnknownTermError as exc:
                    self.refuse(ppath, str(exc))
                    continue
                kind = duo.TERMS[term].kind
                if kind == "permission":
                    purposes.append(term)
                elif term in duo.SUPPORTED_MODIFIERS:
                    modifiers.append(term)
                elif term in duo.UNSUPPORTED_MODIFIERS:
                    self.refuse(ppath, f"not supported: {duo.UNSUPPORTED_MODIFIERS[term]}")
                else:
                    self.refuse(ppath, f"{term} is not a data use permission or modifier")
            elif coding.system == V3_ACT_REASON:
                if coding.code in V3_PURPOSES:
                    purposes.append(V3_PURPOSES[coding.code])
                else:
                    self.refuse(
                        ppath,
                        f"v3 PurposeOfUse {coding.code} has no faithful DUO equivalent "
                        f"(mapped: {', '.join(sorted(V3_PURPOSES))})",
                    )
            else:
                self.refuse(ppath, f"unknown purpose system {coding.system!r} (use DUO or v3 PurposeOfUse)")
        fields["purposes"] = tuple(purposes)
        fields["modifiers"] = tuple(modifiers)
        categories: list[str] = []
        classes = node.class_fhir if self.version == "R4" else node.resourceType
        class_name = "class" if self.version == "R4" else "resourceType"
        for i, coding in enumerate(classes or []):
            cpath = f"{path}.{class_name}[{i}]"
            if coding.system == RESOURCE_TYPES and coding.code in RESOURCE_CATEGORIES:
                categories.append(RESOURCE_CATEGORIES[coding.code])
            elif coding.system == CATEGORY_SYSTEM:
                categories.append(coding.code or "")
            elif coding.system == RESOURCE_TYPES and coding.code == "Observation":
                self.refuse(
                    cpath,
                    "Observation is ambiguous (labs or vitals): state the observation "
                    "category in provision.code instead",
                )
            else:
                self.refuse(cpath, f"{coding.system}#{coding.code} is not a mapped data category")
        diseases: list[str] = []
        for i, coding in enumerate(_codings(node.code)):
            cpath = f"{path}.code[{i}]"
            if coding is None:
                self.refuse(cpath, "a code with text only cannot be evaluated")
            elif coding.system == ICD10_SYSTEM:
                try:
                    diseases.append(normalize_icd10(coding.code or ""))
                except CodeError as exc:
                    self.refuse(cpath, str(exc))
            elif coding.system == OBSERVATION_CATEGORY and coding.code in OBSERVATION_CATEGORIES:
                categories.append(OBSERVATION_CATEGORIES[coding.code])
            elif coding.system == CATEGORY_SYSTEM:
                categories.append(coding.code or "")
            else:
                self.refuse(
                    cpath, f"{coding.system}#{coding.code} is neither an ICD-10 disease nor a data category"
                )
        fields["data_categories"] = tuple(categories)
        fields["diseases"] = tuple(diseases)
        if duo.IS in modifiers and not orgs:
            self.refuse(f"{path}.purpose", "the IS modifier needs the approved institutions as actors")
        for term, field in ((duo.GS, "regions"), (duo.PS, "projects"), (duo.US, "users")):
            if term in modifiers:
                self.refuse(
                    f"{path}.purpose", f"{duo.label(term)} needs {field}, which a FHIR Consent cannot state"
                )
        if duo.MOR in modifiers:
            self.refuse(f"{path}.purpose", "MOR needs a moratorium date, which a FHIR Consent cannot state")
        nested_type = type_ if self.version == "R4" else ("deny" if type_ == "permit" else "permit")
        children: list[Provision] = []
        for i, child in enumerate(node.provision or []):
            cpath = f"{path}.provision[{i}]"
            ctype = child.type if self.version == "R4" else nested_type
            if ctype not in ("permit", "deny"):
                self.refuse(f"{cpath}.type", "a nested provision must say permit or deny")
                continue
            mapped = self.provision(child, cpath, ctype)
            if mapped is not None:
                children.append(mapped)
        fields["provisions"] = tuple(children)
        before = len(self.errors)
        if before:
            return None
        try:
            return Provision(**fields)
        except ValidationError as exc:
            for err in exc.errors():
                self.refuse(path, str(err["msg"]).removeprefix("Value error, "))
            return None


def from_fhir(
    data: dict[str, Any] | str | bytes,
    *,
    hospital: str | None = None,
    version: FhirVersion | None = None,
    previous: Contract | None = None,
) -> Contract:
    """Map a FHIR Consent (R4 or R5 JSON, detected unless given) to a contract, or raise FhirImportError.

    `hospital` defaults to the consent's custodian (R4 `organization[0]`, R5 `controller[0]`,
    which must be `Organization/<id>`); when both are given they must agree (a consent naming
    another hospital is refused, never re-addressed). `previous` makes the result the next
    version of it.
    """
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise FhirImportError([f"not JSON: {exc}"]) from exc
    if not isinstance(data, dict) or data.get("resourceType") != "Consent":
        raise FhirImportError(["resourceType: not a FHIR Consent resource"])
    version = version or detect_version(data)
    try:
        if version == "R4":
            from fhir.resources.R4B.consent import Consent as ConsentR4

            resource: Any = ConsentR4.model_validate(data)
        else:
            from fhir.resources.consent import Consent as ConsentR5

            resource = ConsentR5.model_validate(data)
    except ValidationError as exc:
        raise FhirImportError(
            [
                f"Consent.{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (FHIR {version})"
                for e in exc.errors()
            ]
        ) from exc
    mapper = _Mapper(version)
    mapper.unmapped(
        resource,
        "Consent",
        {
            "extension": "extensions are not interpreted",
            "modifierExtension": "a modifier extension changes the meaning and is not understood",
        },
    )
    if not resource.id:
        mapper.refuse("Consent.id", "needed as the contract id")
    policy: list[str] = []
    if version == "R4":
        pseudonym = _ref_id(resource.patient, "Patient")
        custodian = _ref_id((resource.organization or [None])[0], "Organization")
        issued = _instant(resource.dateTime)
        issued_path = "Consent.dateTime"
        for coding in _codings([resource.scope]):
            if coding is None or coding.system != CONSENT_SCOPE or coding.code not in SCOPES:
                mapper.refuse(
                    "Consent.scope", f"only {', '.join(sorted(SCOPES))} consents govern research use"
                )
        for coding in _codings([resource.policyRule] if resource.policyRule else []):
            if coding is not None:
                policy.append(f"{coding.system}#{coding.code}")
        policy.extend(p.uri or (p.authority or "") for p in resource.policy or [])
        validity = None
        if resource.provision is None:
            mapper.refuse("Consent.provision", "missing: a policy alone is not a machine-readable rule")
            root = None
        elif resource.provision.type not in ("permit", "deny"):
            mapper.refuse("Consent.provision.type", "missing: the root rule must say permit or deny")
            root = None
        else:
            root = mapper.provision(resource.provision, "Consent.provision", resource.provision.type)
    else:
        pseudonym = _ref_id(resource.subject, "Patient")
        custodian = _ref_id((resource.controller or [None])[0], "Organization")
        issued = _instant(resource.date)
        issued_path = "Consent.date"
        mapper.unmapped(
            resource,
            "Consent",
            {
                "grantee": "who receives the rights: state recipients as provision.actor",
            },
        )
        if resource.policyBasis is not None:
            basis = resource.policyBasis
            policy.append(basis.url or getattr(basis.reference, "reference", None) or "")
        for coding in _codings(resource.regulatoryBasis):
            if coding is not None:
                policy.append(f"{coding.system}#{coding.code}")
        validity = _period(resource.period, "Consent.period", mapper.errors)
        if resource.decision not in ("permit", "deny"):
            mapper.refuse("Consent.decision", "missing: the base decision must be permit or deny")
            root = None
        else:
            children: list[Provision] = []
            exception = "deny" if resource.decision == "permit" else "permit"
            for i, node in enumerate(resource.provision or []):
                mapped = mapper.provision(node, f"Consent.provision[{i}]", exception)
                if mapped is not None:
                    children.append(mapped)
            root = None if mapper.errors else Provision(type=resource.decision, provisions=tuple(children))
    if pseudonym is None:
        mapper.refuse(
            "Consent.patient" if version == "R4" else "Consent.subject",
            "needs a reference Patient/<pseudonym>",
        )
    if hospital is not None and custodian is not None and custodian != hospital:
        # the consent was given to another hospital: it does not govern this one's data
        mapper.refuse(
            "Consent.organization" if version == "R4" else "Consent.controller",
            f"names Organization/{custodian}, not this hospital ({hospital}); a consent given to "
            "another hospital does not govern this one's data",
        )
    hospital = hospital or custodian
    if hospital is None:
        mapper.refuse(
            "Consent.organization" if version == "R4" else "Consent.controller",
            "needs Organization/<hospital id> (or pass the hospital explicitly)",
        )
    if issued is None:
        mapper.refuse(
            issued_path, "needs the date the consent was given (with a time zone if a time is given)"
        )
    if mapper.errors or root is None:
        raise FhirImportError(mapper.errors or ["Consent: nothing to import"])
    fields: dict[str, Any] = {
        "contract_id": resource.id,
        "pseudonym": pseudonym,
        "hospital": hospital,
        "issued": issued,
        "status": resource.status,
        "period": validity,
        "policy_basis": tuple(p for p in policy if p),
        "provision": root,
        "version": 1,
    }
    if previous is not None:
        fields.update(version=previous.version + 1, supersedes=previous.content_hash)
    try:
        return Contract(**fields)
    except ValidationError as exc:
        raise FhirImportError(
            [f"Consent ({'.'.join(str(p) for p in e['loc'])}): {e['msg']}" for e in exc.errors()]
        ) from exc
