"""A merge as validated data: ``MergeConfig.from_yaml(text)`` / ``cfg.to_yaml()`` round-trip.

    method: dare_ties          # a registry name (aliases ta / vanilla / linear / devec_ta accepted)
    inputs: [math/, code/]     # optional: what to load
    weights: [0.6, 0.4]        # one for all, a list in input order, or name: coefficient
    pair_weights: 0.5          # DeVec methods only
    params: {density: 0.5, seed: 0}
    convention: peft           # or mergekit
"""

from __future__ import annotations

from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from .engine import merge
from .registry import ALIASES, MethodName, get_method, resolve_params


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=False)

    method: MethodName
    inputs: list[str] = []
    weights: Union[float, list[float], dict[str, float]] = 1.0
    pair_weights: Union[float, dict[str, float], None] = None
    params: dict[str, Any] = {}
    convention: Literal["peft", "mergekit"] = "peft"

    @field_validator("method", mode="before")
    @classmethod
    def _alias(cls, v):
        return ALIASES.get(v, v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self):
        m = get_method(self.method)
        resolve_params(m, self.params, self.convention)  # unknown / bad parameters fail here
        if self.pair_weights is not None and not m.is_devec:
            raise ValueError(f"pair_weights apply to DeVec methods only, not {m.name.value!r}")
        if isinstance(self.weights, list) and self.inputs and len(self.weights) != len(self.inputs):
            raise ValueError(f"weights: {len(self.weights)} coefficients for {len(self.inputs)} inputs")
        return self

    @classmethod
    def from_yaml(cls, text: str) -> "MergeConfig":
        return cls.model_validate(yaml.safe_load(text))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def run(self, vectors, **kw):
        """``engine.merge`` with these settings."""
        return merge(vectors, self.method, self.weights, convention=self.convention, pair_weights=self.pair_weights, **self.params, **kw)
