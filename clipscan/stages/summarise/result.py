"""What the LLM summary of one set of cases found: the failure types and how the run of prompts went.

``Failures`` is what the summary stage returns, the judge refines and the reports render;
``failures.json`` is its ``to_json`` (DAF: one; TCAC: one per transform under
``transforms``). ``Failures.off()`` is the one value for a run with ``llm.backend: off``,
and ``note`` the one sentence every report shows for a summary without types.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

OFF_NOTE = "The LLM summary was not run (llm.backend is off), so failures are not grouped into types."

# The run facts ``failures.json`` carries besides the counts, in the order it writes them.
FACTS = ("model", "cases", "truncated", "token_count", "template", "merge", "merge_threshold", "wall_s")


@dataclass(frozen=True)
class Failures:
    """backend: ``off``, ``openai`` or ``vllm``; types: the canonical failure types, each
    {type, description, prompts, cases, examples, ...} (``judge`` where judged); status:
    ``off``, ``done``, or ``failed`` (there were prompts and not one answer parsed, ``reason``
    says why); prompts/parsed/failed/retried: the answers' counts; facts: the run's other
    figures (``FACTS`` and any backend's own); judge: the judge's summary, once it ran."""

    backend: str
    types: list[dict[str, Any]] = field(default_factory=list)
    status: str = "done"
    reason: str | None = None
    prompts: int = 0
    parsed: int = 0
    failed: int = 0
    retried: int = 0
    facts: dict[str, Any] = field(default_factory=dict)
    judge: dict[str, Any] | None = None

    @classmethod
    def off(cls) -> Failures:
        return cls("off", status="off")

    @property
    def model(self) -> str | None:
        return self.facts.get("model")

    def replace(self, **changes: Any) -> Failures:
        return dataclasses.replace(self, **changes)

    def note(self) -> str:
        """The sentence a report shows beside the types: why there are none, or how many answers parsed."""
        if self.status == "off":
            return OFF_NOTE
        if self.prompts and not self.parsed:
            return (f"None of the {self.prompts} LLM answers could be parsed into failure types "
                    "(see llm_raw.jsonl for the raw answers and reasons).")
        if not self.types:
            return (f"The LLM summary found no failure types ({self.parsed} of {self.prompts} answers parsed)."
                    if self.prompts else "The LLM summary found no failure types.")
        return f"{self.parsed} of {self.prompts} LLM answers parsed ({self.backend}: {self.model or ''})."

    def to_json(self) -> dict[str, Any]:
        if self.status == "off":
            return {"backend": "off", "status": "off", "types": []}
        out: dict[str, Any] = {"backend": self.backend, "model": self.model, "status": self.status,
                               "reason": self.reason, "prompts": self.prompts, "parsed": self.parsed,
                               "failed": self.failed, "retried": self.retried}
        out.update({k: v for k, v in self.facts.items() if k != "model"})
        out["types"] = self.types
        if self.judge is not None:
            out["judge"] = self.judge
        return out

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> Failures:
        """Read back what ``to_json`` wrote."""
        if doc.get("backend") == "off":
            return cls.off()
        counts = {k: int(doc.get(k) or 0) for k in ("prompts", "parsed", "failed", "retried")}
        known = {"backend", "status", "reason", "types", "judge", *counts}
        return cls(str(doc["backend"]), list(doc.get("types") or []), str(doc.get("status") or "done"),
                   doc.get("reason"), facts={k: v for k, v in doc.items()
                                             if k not in known and (k != "model" or v is not None)},
                   judge=doc.get("judge"), **counts)
