"""Study ids as a steward types them: the full id, or any prefix that names one study.

Coordinator study ids are long (UUID-like); a steward copies the first characters from
`exchange node status`, as with git commit ids. A prefix that matches several studies is an
error listing them, never a guess.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from exchange.node.models import StudyRow

#: the shortest prefix accepted: shorter ones would match by accident
MIN_PREFIX = 4


class StudyIdError(LookupError):
    """No study, or several, for what the steward typed; the message says which."""


def resolve_study_id(session: Session, text: str, *, unknown_ok: bool = False) -> str:
    """The id of the one study that `text` names exactly or by unique prefix. With
    `unknown_ok`, text that matches no study here is taken as a full id (for the commands
    that read the node's other records of a study, such as its reward openings)."""
    text = text.strip()
    if not text:
        raise StudyIdError("study id: empty")
    if session.get(StudyRow, text) is not None:
        return text
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    matches = list(session.execute(select(StudyRow.study_id).where(StudyRow.study_id.like(
        f"{escaped}%", escape="\\")).order_by(StudyRow.study_id).limit(11)).scalars())
    matches = [m for m in matches if m.startswith(text)]
    if not matches:
        if unknown_ok:
            return text
        raise StudyIdError(f"study {text!r} is not known to this node (the daemon records studies "
                           "when it polls the coordinator; `exchange node status` lists them)")
    if len(matches) > 1:
        shown = ", ".join(matches[:10]) + (", ..." if len(matches) > 10 else "")
        raise StudyIdError(f"study id prefix {text!r} is ambiguous: it matches {shown}; type more of the id")
    if len(text) < MIN_PREFIX:
        raise StudyIdError(f"study id prefix {text!r} is too short: give at least {MIN_PREFIX} characters "
                           f"(it matches {matches[0]})")
    return matches[0]
