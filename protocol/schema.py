"""Input and output schemas of a packaged model.

A *row* is the user's view: one value per feature, in ``InputSchema.features`` order.
A model may take several named input tensors (a ColumnTransformer pipeline takes one per
column group); ``ModelInput.features`` says which row columns feed which tensor, and
``ModelInput.shape`` (batch dimension first, ``None`` = dynamic) how they are reshaped.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

DType = Literal["float32", "float64", "int64", "int32", "uint8", "int8", "string", "bool"]
Scalar = Union[float, int, str, bool, None]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FeatureSpec(_Frozen):
    name: str = Field(min_length=1, max_length=200)
    kind: Literal["numeric", "categorical"] = "numeric"
    dtype: DType = "float32"
    allow_nan: bool = False
    # Observed range on the reference data, used to count out-of-range values.
    min: float | None = None
    max: float | None = None
    # Known categories for categorical features (from the reference data).
    categories: list[str] | None = None


class ModelInput(_Frozen):
    name: str
    dtype: DType
    shape: list[int | None]
    features: list[str] = Field(min_length=1)


class InputSchema(_Frozen):
    features: list[FeatureSpec] = Field(min_length=1)
    inputs: list[ModelInput] = Field(min_length=1)

    @model_validator(mode="after")
    def _inputs_cover_known_features(self) -> InputSchema:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        known = set(names)
        for inp in self.inputs:
            unknown = [f for f in inp.features if f not in known]
            if unknown:
                raise ValueError(f"input {inp.name!r} names unknown features {unknown[:3]}")
        return self

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def n_features(self) -> int:
        return len(self.features)


class OutputSchema(_Frozen):
    task: Literal["classification", "regression"]
    # Classification: the class labels in the order of the probability columns.
    classes: list[Union[int, str]] | None = None
    # Names of the model's output tensors that carry the label / probabilities / values.
    label_output: str | None = None
    probability_output: str | None = None
    value_output: str | None = None
    n_outputs: int = 1
