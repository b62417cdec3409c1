"""Clinical variables and the heads that fuse them with image features.

* :class:`ClinicalVariable` / :class:`ClinicalSchema` — the clinical inputs a model bundle declares
  (name, type, unit, valid range or categories, rule for a missing value); :meth:`ClinicalSchema.parse`
  turns what a user typed into the model's feature vector plus plain-language notes, and refuses
  values out of range, of the wrong type or unknown to the model with a :class:`ClinicalInputError`.
* Fusion heads (scikit-learn estimators): :class:`MLPFusionHead` (image embedding + clinical values,
  Lu et al. 2025), :class:`SVMFusionHead` (deep features + clinical parameters, Yang et al. 2024,
  CLDLR), :class:`ScoreFusionHead` (image score + clinical score, Bong et al. 2023).
* :func:`head_to_dict` / :func:`head_from_dict` — fitted heads as JSON-able dicts, without pickle.

Every head predicts with its own numpy code from a few stored arrays, so a head rebuilt from its dict
gives bit-identical probabilities.  scikit-learn is used for fitting only.
"""
from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neural_network import MLPClassifier
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y

from .errors import ClinicalInputError, ModelBundleError

TYPES = ("number", "bool", "category")
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "none", "null", "missing", "unknown", "?"})
TRUE_TOKENS = frozenset({"yes", "y", "true", "t", "1", "present", "positive"})
FALSE_TOKENS = frozenset({"no", "n", "false", "f", "0", "absent", "negative"})


def _fmt(x: float) -> str:
    """A number as a person writes it: 150, 22.5, 0.001."""
    return f"{float(x):g}"


# ============================================================================ variables
@dataclass
class ClinicalVariable:
    """One clinical input of a model.

    ``missing``: ``"refuse"`` (the value is required), ``"impute:<value>"`` (replace by that value),
    ``"impute_median"`` (replace by ``median``, numbers only) or ``"indicator"`` (add a 0/1 column
    ``<name>_missing``; the value column gets ``median`` or 0, a one-hot block gets zeros).
    ``encoding`` applies to categories: ``"onehot"`` (one column per category) or ``"ordinal"`` (the
    category's index).  ``default`` is only the value a form starts from.
    """

    name: str
    type: str
    unit: str = ""
    valid_range: Optional[Tuple[Optional[float], Optional[float]]] = None
    categories: Optional[Tuple[str, ...]] = None
    missing: str = "refuse"
    description: str = ""
    median: Optional[float] = None
    default: Any = None
    encoding: str = "onehot"

    def __post_init__(self) -> None:
        where = f"clinical variable {self.name!r}"
        if not self.name or not isinstance(self.name, str):
            raise ModelBundleError("A clinical variable in the model bundle has no name; the bundle is damaged.")
        if self.type not in TYPES:
            raise ModelBundleError(f"The model bundle's {where} has type {self.type!r}; expected one of {', '.join(TYPES)}.")
        if self.valid_range is not None:
            lo, hi = (list(self.valid_range) + [None, None])[:2]
            lo = None if lo is None else float(lo)
            hi = None if hi is None else float(hi)
            if lo is not None and hi is not None and lo > hi:
                raise ModelBundleError(f"The model bundle's {where} has an empty valid range [{lo}, {hi}].")
            self.valid_range = (lo, hi)
        if self.type == "category":
            if not self.categories:
                raise ModelBundleError(f"The model bundle's {where} is a category without a list of categories.")
            self.categories = tuple(str(c) for c in self.categories)
            if len({c.lower() for c in self.categories}) != len(self.categories):
                raise ModelBundleError(f"The model bundle's {where} lists a category twice.")
            if self.encoding not in ("onehot", "ordinal"):
                raise ModelBundleError(f"The model bundle's {where} has encoding {self.encoding!r}; expected onehot or ordinal.")
        if self.median is not None:
            self.median = float(self.median)
        rule = self.missing
        if rule == "impute_median":
            if self.type != "number" or self.median is None:
                raise ModelBundleError(f"The model bundle's {where} uses impute_median but declares no median number.")
        elif rule.startswith("impute:"):
            try:
                value = self.convert(rule[len("impute:"):])
            except ClinicalInputError as exc:
                raise ModelBundleError(f"The model bundle's {where} has an invalid imputation value: {exc}") from exc
            if value is None:
                raise ModelBundleError(f"The model bundle's {where} imputes a missing value by a missing value.")
        elif rule not in ("refuse", "indicator"):
            raise ModelBundleError(
                f"The model bundle's {where} has missing rule {rule!r}; expected refuse, impute:<value>, impute_median or indicator."
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClinicalVariable":
        """From a manifest entry; the range may be ``valid_range``/``range`` [min, max] or ``min``/``max``."""
        rng = d.get("valid_range", d.get("range"))
        if rng is None and ("min" in d or "max" in d):
            rng = (d.get("min"), d.get("max"))
        try:
            return cls(
                name=d["name"],
                type=d.get("type", "number"),
                unit=d.get("unit", "") or "",
                valid_range=None if rng is None else tuple(rng),
                categories=None if d.get("categories") is None else tuple(d["categories"]),
                missing=d.get("missing", "refuse"),
                description=d.get("description", "") or "",
                median=d.get("median"),
                default=d.get("default"),
                encoding=d.get("encoding", "onehot"),
            )
        except KeyError as exc:
            raise ModelBundleError("A clinical variable in the model bundle has no name; the bundle is damaged.") from exc
        except (TypeError, ValueError) as exc:
            raise ModelBundleError(f"A clinical variable in the model bundle is malformed ({exc}).") from exc

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"name": self.name, "type": self.type, "unit": self.unit, "missing": self.missing,
                             "description": self.description}
        if self.valid_range is not None:
            d["valid_range"] = list(self.valid_range)
        if self.categories is not None:
            d["categories"] = list(self.categories)
            d["encoding"] = self.encoding
        if self.median is not None:
            d["median"] = self.median
        if self.default is not None:
            d["default"] = self.default
        return d

    # ------------------------------------------------------------------ text
    def _with_unit(self, value: str) -> str:
        return f"{value} {self.unit}" if self.unit else value

    def range_text(self) -> str:
        """"18–100 years", "at least 0 mm", "yes or no", "one of A, B", or "" without a limit."""
        if self.type == "bool":
            return "yes or no"
        if self.type == "category":
            return "one of " + ", ".join(self.categories or ())
        if self.valid_range is None:
            return ""
        lo, hi = self.valid_range
        if lo is not None and hi is not None:
            return f"{_fmt(lo)}–{self._with_unit(_fmt(hi))}"
        if lo is not None:
            return "at least " + self._with_unit(_fmt(lo))
        if hi is not None:
            return "at most " + self._with_unit(_fmt(hi))
        return ""

    def _what_to_enter(self) -> str:
        if self.type == "number":
            unit = f" in {self.unit}" if self.unit else ""
            rng = self.range_text()
            return f"enter {self.name}{unit}" + (f" (valid range {rng})" if rng else "")
        return f"enter {self.name} as {self.range_text()}"

    # ------------------------------------------------------------------ conversion
    def convert(self, raw: Any) -> Any:
        """A float, bool or canonical category name; None when the value is missing.  Raises
        :class:`ClinicalInputError` for a value of the wrong type or out of range."""
        if raw is None or (isinstance(raw, float) and math.isnan(raw)):
            return None
        text = raw.strip() if isinstance(raw, str) else None
        if self.type == "category":
            if text is not None:
                for c in self.categories or ():
                    if c.lower() == text.lower():
                        return c
            if text is not None and text.lower() in MISSING_TOKENS:
                return None
            raise ClinicalInputError(
                f"{self.name} = {raw!r} is not one of the categories {', '.join(self.categories or ())}; enter one of them."
            )
        if text is not None and text.lower() in MISSING_TOKENS:
            return None
        if self.type == "bool":
            if isinstance(raw, (bool, np.bool_)):
                return bool(raw)
            if isinstance(raw, (int, float, np.integer, np.floating)) and float(raw) in (0.0, 1.0):
                return bool(raw)
            if text is not None and text.lower() in TRUE_TOKENS:
                return True
            if text is not None and text.lower() in FALSE_TOKENS:
                return False
            raise ClinicalInputError(f"{self.name} = {raw!r} is not yes or no; enter yes or no.")
        # number
        value: Optional[float] = None
        if isinstance(raw, (int, float, np.integer, np.floating)) and not isinstance(raw, (bool, np.bool_)):
            value = float(raw)
        elif text is not None:
            if self.unit and text.lower().endswith(self.unit.lower()):
                text = text[: -len(self.unit)].strip()
            try:
                value = float(text)
            except ValueError:
                value = None
        if value is None or not math.isfinite(value):
            raise ClinicalInputError(f"{self.name} = {raw!r} is not a number; {self._what_to_enter()}.")
        if self.valid_range is not None:
            lo, hi = self.valid_range
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise ClinicalInputError(
                    f"{self.name} = {self._with_unit(_fmt(value))} is outside the valid range {self.range_text()}; "
                    "enter a value in that range."
                )
        return value

    # ------------------------------------------------------------------ encoding
    @property
    def feature_names(self) -> List[str]:
        if self.type == "category" and self.encoding == "onehot":
            names = [f"{self.name}={c}" for c in self.categories or ()]
        else:
            names = [self.name]
        if self.missing == "indicator":
            names.append(f"{self.name}_missing")
        return names

    def _columns(self, value: Any) -> List[float]:
        if self.type == "number":
            return [float(value)]
        if self.type == "bool":
            return [1.0 if value else 0.0]
        cats = list(self.categories or ())
        if self.encoding == "ordinal":
            return [float(cats.index(value))]
        return [1.0 if c == value else 0.0 for c in cats]

    def encode(self, value: Any) -> Tuple[List[float], Optional[str]]:
        """Feature columns for a converted value (None = missing) and a note when a rule was applied."""
        rule = self.missing
        if value is not None:
            return self._columns(value) + ([0.0] if rule == "indicator" else []), None
        if rule == "refuse":
            raise ClinicalInputError(f"{self.name} is missing and this model cannot work without it; {self._what_to_enter()}.")
        if rule == "impute_median":
            return self._columns(self.median), (
                f"{self.name} missing: replaced by the training median {self._with_unit(_fmt(self.median))}"  # type: ignore[arg-type]
            )
        if rule.startswith("impute:"):
            imputed = self.convert(rule[len("impute:"):])
            shown = ("yes" if imputed else "no") if self.type == "bool" else (
                self._with_unit(_fmt(imputed)) if self.type == "number" else str(imputed))
            return self._columns(imputed), f"{self.name} missing: replaced by the model's default {shown}"
        # indicator
        if self.type == "category" and self.encoding == "onehot":
            cols = [0.0] * len(self.categories or ())
        elif self.type == "bool":
            cols = [0.0]
        else:
            cols = [self.median if self.median is not None else 0.0]
        fill = "zeros" if self.type == "category" and self.encoding == "onehot" else _fmt(cols[0])
        return cols + [1.0], f"{self.name} missing: flagged as missing for the model (value set to {fill}, indicator = 1)"


# ============================================================================ schema
def parse_cli(items: Sequence[str]) -> Dict[str, str]:
    """``["age=52", "family_history=yes"]`` → ``{"age": "52", "family_history": "yes"}``."""
    values: Dict[str, str] = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        name = name.strip()
        if not sep or not name:
            raise ClinicalInputError(f"{item!r} is not of the form name=value (for example age=52).")
        if name in values:
            raise ClinicalInputError(f"{name} is given twice; give each clinical value once.")
        values[name] = value.strip()
    return values


def from_json(path: str | Path) -> Dict[str, Any]:
    """Clinical values from a JSON file holding one object ``{name: value}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ClinicalInputError(f"Could not read clinical values from {path.name} ({exc}); give a JSON file like {{\"age\": 52}}.") from exc
    if not isinstance(data, dict):
        raise ClinicalInputError(f"{path.name} must hold one JSON object like {{\"age\": 52}}, not a {type(data).__name__}.")
    return data


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


class ClinicalSchema:
    """The ordered clinical inputs of a model; the vector concatenates each variable's columns."""

    def __init__(self, variables: Sequence[ClinicalVariable | Mapping[str, Any]]) -> None:
        self.variables: List[ClinicalVariable] = [
            v if isinstance(v, ClinicalVariable) else ClinicalVariable.from_dict(v) for v in variables
        ]
        keys = [_key(v.name) for v in self.variables]
        if len(set(keys)) != len(keys):
            raise ModelBundleError("The model bundle declares a clinical variable twice; the bundle is damaged.")
        self._by_key = {_key(v.name): v for v in self.variables}

    @classmethod
    def from_manifest(cls, spec: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> "ClinicalSchema":
        """From a list of variable dicts or ``{"variables": [...]}``."""
        if isinstance(spec, Mapping):
            spec = spec.get("variables", [])
        return cls(list(spec))

    def to_manifest(self) -> List[Dict[str, Any]]:
        return [v.to_dict() for v in self.variables]

    @property
    def names(self) -> List[str]:
        return [v.name for v in self.variables]

    @property
    def feature_names(self) -> List[str]:
        return [n for v in self.variables for n in v.feature_names]

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def parse_values(self, values: Mapping[str, Any]) -> Dict[str, Any]:
        """{name: converted value or None (missing)} for every variable.  Names match ignoring case, and
        "-" or " " for "_"; unknown or repeated names are refused."""
        out: Dict[str, Any] = {v.name: None for v in self.variables}
        seen: set = set()
        for name, raw in values.items():
            var = self._by_key.get(_key(str(name)))
            if var is None:
                close = difflib.get_close_matches(str(name), self.names, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                known = ", ".join(self.names) or "none"
                raise ClinicalInputError(f"{name!r} is not a clinical variable of this model{hint}; it uses: {known}.")
            if var.name in seen:
                raise ClinicalInputError(f"{var.name} is given twice; give each clinical value once.")
            seen.add(var.name)
            out[var.name] = var.convert(raw)
        return out

    def encode(self, cleaned: Mapping[str, Any]) -> Tuple[np.ndarray, List[str]]:
        """The feature vector of converted values (from :meth:`parse_values`) and the notes."""
        cols: List[float] = []
        notes: List[str] = []
        for var in self.variables:
            c, note = var.encode(cleaned.get(var.name))
            cols.extend(c)
            if note:
                notes.append(note)
        return np.asarray(cols, dtype=np.float64), notes

    def parse(self, values: Mapping[str, Any]) -> Tuple[np.ndarray, List[str]]:
        """User values (numbers, booleans or strings) → (feature vector, notes on missing values)."""
        return self.encode(self.parse_values(values))

    def parse_cli(self, items: Sequence[str]) -> Tuple[np.ndarray, List[str]]:
        return self.parse(parse_cli(items))

    def parse_json(self, path: str | Path) -> Tuple[np.ndarray, List[str]]:
        return self.parse(from_json(path))

    def to_form_spec(self) -> List[Dict[str, Any]]:
        """One dict per variable for a GUI form: widget kind, label, limits, choices, required, default."""
        spec = []
        for v in self.variables:
            lo, hi = v.valid_range if v.valid_range is not None else (None, None)
            spec.append({
                "name": v.name,
                "label": v.name.replace("_", " ").capitalize() + (f" ({v.unit})" if v.unit else ""),
                "type": v.type,
                "widget": {"number": "spinbox", "bool": "checkbox", "category": "combobox"}[v.type],
                "unit": v.unit,
                "min": lo,
                "max": hi,
                "categories": list(v.categories) if v.categories else None,
                "required": v.missing == "refuse",
                "missing": v.missing,
                "default": v.default,
                "description": v.description,
                "help": (v.description + " " if v.description else "") + (f"Valid: {v.range_text()}." if v.range_text() else ""),
            })
        return spec


# ============================================================================ fusion heads
class _FusionHead(ClassifierMixin, BaseEstimator):
    """Shared plumbing: input checks, predict from predict_proba, fitted state as arrays."""

    _state_keys: Tuple[str, ...] = ()

    def _fit_input(self, X: Any, y: Any) -> Tuple[np.ndarray, np.ndarray]:
        X, y = check_X_y(X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError("fitting a fusion head needs at least two classes in y")
        self.n_features_in_ = X.shape[1]
        return X, y

    def _input(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "classes_")
        X = check_array(X, dtype=np.float64)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but {type(self).__name__} was fitted with {self.n_features_in_}")
        return X

    def predict_proba(self, X: Any) -> np.ndarray:
        return self._proba(self._input(X))

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def _proba(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _scale(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean_) / self.scale_ if self.scale else X

    def _fit_scaler(self, X: np.ndarray) -> np.ndarray:
        self.mean_ = X.mean(axis=0) if self.scale else np.zeros(X.shape[1])
        std = X.std(axis=0) if self.scale else np.ones(X.shape[1])
        self.scale_ = np.where(std < 10 * np.finfo(np.float64).eps, 1.0, std)
        return self._scale(X)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _two_columns(p1: np.ndarray) -> np.ndarray:
    return np.column_stack([1.0 - p1, p1])


_ACTIVATIONS = {
    "relu": lambda a: np.maximum(a, 0.0),
    "tanh": np.tanh,
    "logistic": expit,
    "identity": lambda a: a,
}


class MLPFusionHead(_FusionHead):
    """Multilayer perceptron on [image embedding, clinical vector] (Lu et al. 2025).

    Standardises each column (``scale=True``) then fits :class:`sklearn.neural_network.MLPClassifier`
    (``hidden`` layer sizes, L2 penalty ``alpha``); predicts with its own forward pass.
    """

    _state_keys = ("mean_", "scale_", "coefs_", "intercepts_")

    def __init__(self, hidden: Sequence[int] = (64,), alpha: float = 1e-4, activation: str = "relu",
                 solver: str = "lbfgs", max_iter: int = 1000, scale: bool = True, random_state: Optional[int] = 0) -> None:
        self.hidden = hidden
        self.alpha = alpha
        self.activation = activation
        self.solver = solver
        self.max_iter = max_iter
        self.scale = scale
        self.random_state = random_state

    def fit(self, X: Any, y: Any) -> "MLPFusionHead":
        X, y = self._fit_input(X, y)
        mlp = MLPClassifier(hidden_layer_sizes=tuple(int(h) for h in self.hidden), alpha=self.alpha,
                            activation=self.activation, solver=self.solver, max_iter=self.max_iter,
                            random_state=self.random_state)
        mlp.fit(self._fit_scaler(X), y)
        self.coefs_ = [np.asarray(w, dtype=np.float64) for w in mlp.coefs_]
        self.intercepts_ = [np.asarray(b, dtype=np.float64) for b in mlp.intercepts_]
        return self

    def _proba(self, X: np.ndarray) -> np.ndarray:
        a = self._scale(X)
        act = _ACTIVATIONS[self.activation]
        last = len(self.coefs_) - 1
        for n, (w, b) in enumerate(zip(self.coefs_, self.intercepts_)):
            a = a @ w + b
            if n < last:
                a = act(a)
        return _two_columns(expit(a[:, 0])) if a.shape[1] == 1 else _softmax(a)


class SVMFusionHead(_FusionHead):
    """Support vector machine on [deep features, clinical parameters] (Yang et al. 2024, CLDLR).

    Standardises each column, fits :class:`sklearn.svm.SVC` (binary only) and calibrates its decision
    value f with Platt scaling, P(classes_[1]) = 1 / (1 + exp(-(a f + b))), fitted on cross-validated
    decision values (``calibration_cv`` stratified folds) with Platt's smoothed targets.  This replaces
    libsvm's internal ``probability=True`` so that the head is fully described by its support vectors,
    dual coefficients, intercept, gamma and (a, b), and serialises without pickle.
    """

    _state_keys = ("mean_", "scale_", "support_vectors_", "dual_coef_", "intercept_", "gamma_", "platt_")

    def __init__(self, C: float = 1.0, kernel: str = "rbf", gamma: Any = "scale", degree: int = 3,
                 coef0: float = 0.0, scale: bool = True, calibration_cv: int = 5, random_state: Optional[int] = 0) -> None:
        self.C = C
        self.kernel = kernel
        self.gamma = gamma
        self.degree = degree
        self.coef0 = coef0
        self.scale = scale
        self.calibration_cv = calibration_cv
        self.random_state = random_state

    def _gamma_value(self, X: np.ndarray) -> float:
        if self.gamma == "scale":
            var = X.var()
            return 1.0 / (X.shape[1] * var) if var != 0 else 1.0
        if self.gamma == "auto":
            return 1.0 / X.shape[1]
        return float(self.gamma)

    def _svc(self) -> SVC:
        return SVC(C=self.C, kernel=self.kernel, gamma=self.gamma_, degree=self.degree, coef0=self.coef0)

    def fit(self, X: Any, y: Any) -> "SVMFusionHead":
        X, y = self._fit_input(X, y)
        if len(self.classes_) != 2:
            raise ValueError("SVMFusionHead is binary; y must have exactly two classes")
        if self.kernel not in ("linear", "rbf", "poly", "sigmoid"):
            raise ValueError(f"kernel must be linear, rbf, poly or sigmoid, got {self.kernel!r}")
        Xs = self._fit_scaler(X)
        self.gamma_ = self._gamma_value(Xs)
        svc = self._svc().fit(Xs, y)
        # sklearn's public dual_coef_/intercept_ are signed so that f > 0 means classes_[1].
        self.support_vectors_ = np.asarray(svc.support_vectors_, dtype=np.float64)
        self.dual_coef_ = np.asarray(svc.dual_coef_, dtype=np.float64).ravel()
        self.intercept_ = np.asarray(svc.intercept_, dtype=np.float64).ravel()
        positive = y == self.classes_[1]
        folds = min(int(self.calibration_cv), int(positive.sum()), int((~positive).sum()))
        if folds >= 2:
            cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=self.random_state)
            f = cross_val_predict(self._svc(), Xs, y, cv=cv, method="decision_function")
        else:
            f = self._decision(Xs)
        self.platt_ = np.asarray(_platt(f, positive), dtype=np.float64)
        return self

    def _kernel(self, X: np.ndarray) -> np.ndarray:
        sv = self.support_vectors_
        if self.kernel == "linear":
            return X @ sv.T
        if self.kernel == "rbf":
            d2 = (X * X).sum(1)[:, None] + (sv * sv).sum(1)[None, :] - 2.0 * X @ sv.T
            return np.exp(-self.gamma_ * np.maximum(d2, 0.0))
        if self.kernel == "poly":
            return (self.gamma_ * (X @ sv.T) + self.coef0) ** self.degree
        return np.tanh(self.gamma_ * (X @ sv.T) + self.coef0)

    def _decision(self, Xs: np.ndarray) -> np.ndarray:
        return self._kernel(Xs) @ self.dual_coef_ + self.intercept_[0]

    def decision_function(self, X: Any) -> np.ndarray:
        """SVM decision value f (> 0 favours ``classes_[1]``)."""
        return self._decision(self._scale(self._input(X)))

    def _proba(self, X: np.ndarray) -> np.ndarray:
        a, b = self.platt_
        return _two_columns(expit(a * self._decision(self._scale(X)) + b))


def _platt(f: np.ndarray, positive: np.ndarray) -> Tuple[float, float]:
    """Platt (1999) sigmoid fit with smoothed targets: minimise cross-entropy of expit(a f + b)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    t = np.where(positive, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    f = np.asarray(f, dtype=np.float64)

    def loss(ab: np.ndarray) -> Tuple[float, np.ndarray]:
        z = ab[0] * f + ab[1]
        # -[t log p + (1-t) log(1-p)] with p = expit(z), written stably.
        val = np.sum(np.logaddexp(0.0, z) - t * z)
        g = expit(z) - t
        return float(val), np.array([np.sum(g * f), np.sum(g)])

    res = minimize(loss, x0=np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    return float(res.x[0]), float(res.x[1])


class ScoreFusionHead(_FusionHead):
    """Fusion of scores, e.g. [image score, clinical score] (Bong et al. 2023).

    ``method="logistic"``: L2 logistic regression (``C``); ``method="tree"``: a decision tree
    (``max_depth``, ``min_samples_leaf``).  No scaling: scores are already comparable.
    """

    _state_keys = ("coef_", "intercept_", "tree_children_left_", "tree_children_right_", "tree_feature_",
                   "tree_threshold_", "tree_value_")

    def __init__(self, method: str = "logistic", C: float = 1.0, max_depth: Optional[int] = 3,
                 min_samples_leaf: int = 5, random_state: Optional[int] = 0) -> None:
        self.method = method
        self.C = C
        self.max_depth = max_depth
        self.min_samples_leaf = min_samples_leaf
        self.random_state = random_state

    def fit(self, X: Any, y: Any) -> "ScoreFusionHead":
        X, y = self._fit_input(X, y)
        if self.method == "logistic":
            lr = LogisticRegression(C=self.C, max_iter=1000).fit(X, y)
            self.coef_ = np.asarray(lr.coef_, dtype=np.float64)
            self.intercept_ = np.asarray(lr.intercept_, dtype=np.float64)
        elif self.method == "tree":
            tree = DecisionTreeClassifier(max_depth=self.max_depth, min_samples_leaf=self.min_samples_leaf,
                                          random_state=self.random_state).fit(X, y).tree_
            self.tree_children_left_ = np.asarray(tree.children_left, dtype=np.int64)
            self.tree_children_right_ = np.asarray(tree.children_right, dtype=np.int64)
            self.tree_feature_ = np.asarray(tree.feature, dtype=np.int64)
            self.tree_threshold_ = np.asarray(tree.threshold, dtype=np.float64)
            value = np.asarray(tree.value, dtype=np.float64)[:, 0, :]
            self.tree_value_ = value / value.sum(axis=1, keepdims=True)
        else:
            raise ValueError(f"method must be 'logistic' or 'tree', got {self.method!r}")
        return self

    @available_if(lambda self: self.method == "logistic")
    def decision_function(self, X: Any) -> np.ndarray:
        """Linear score of the logistic model (> 0 favours ``classes_[1]`` when binary); exists only
        for ``method="logistic"``."""
        z = self._input(X) @ self.coef_.T + self.intercept_
        return z[:, 0] if z.shape[1] == 1 else z

    def _proba(self, X: np.ndarray) -> np.ndarray:
        if self.method == "logistic":
            z = X @ self.coef_.T + self.intercept_
            return _two_columns(expit(z[:, 0])) if z.shape[1] == 1 else _softmax(z)
        # Tree: same float32 comparison as scikit-learn's tree.
        Xf = X.astype(np.float32)
        node = np.zeros(len(X), dtype=np.int64)
        rows = np.arange(len(X))
        while True:
            inner = self.tree_children_left_[node] != -1
            if not inner.any():
                break
            n, r = node[inner], rows[inner]
            go_left = Xf[r, self.tree_feature_[n]] <= self.tree_threshold_[n]
            node[inner] = np.where(go_left, self.tree_children_left_[n], self.tree_children_right_[n])
        return self.tree_value_[node]


class LinearFusionHead(_FusionHead):
    """Logistic regression on standardised inputs, e.g. [logit of an image score, lesion features].

    ``fit`` is one L2 logistic regression (``C``) on the columns standardised with their training mean and
    standard deviation.  The morphology models set ``mean_``, ``scale_``, ``coef_`` and ``intercept_`` from a
    two-stage fit instead (:mod:`BreastDLRLib.training.morphology`); prediction is the same linear score.
    """

    _state_keys = ("mean_", "scale_", "coef_", "intercept_")

    def __init__(self, C: float = 1.0, scale: bool = True) -> None:
        self.C = C
        self.scale = scale

    def fit(self, X: Any, y: Any) -> "LinearFusionHead":
        X, y = self._fit_input(X, y)
        lr = LogisticRegression(C=self.C, max_iter=5000).fit(self._fit_scaler(X), y)
        self.coef_ = np.asarray(lr.coef_, dtype=np.float64)
        self.intercept_ = np.asarray(lr.intercept_, dtype=np.float64)
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        z = self._scale(self._input(X)) @ self.coef_.T + self.intercept_
        return z[:, 0] if z.shape[1] == 1 else z

    def _proba(self, X: np.ndarray) -> np.ndarray:
        z = self._scale(X) @ self.coef_.T + self.intercept_
        return _two_columns(expit(z[:, 0])) if z.shape[1] == 1 else _softmax(z)


# ============================================================================ serialisation
HEADS: Dict[str, type] = {"MLPFusionHead": MLPFusionHead, "SVMFusionHead": SVMFusionHead, "ScoreFusionHead": ScoreFusionHead,
                          "LinearFusionHead": LinearFusionHead}
HEAD_FORMAT = "breastdlr-fusion-head"


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def head_to_dict(head: _FusionHead) -> Dict[str, Any]:
    """A fitted head as plain JSON-able lists and numbers (no pickle)."""
    name = type(head).__name__
    if name not in HEADS:
        raise TypeError(f"not a BreastDLR fusion head: {name}")
    check_is_fitted(head, "classes_")
    state = {k: _jsonable(getattr(head, k)) for k in head._state_keys if hasattr(head, k)}
    return {
        "format": HEAD_FORMAT,
        "version": 1,
        "class": name,
        "params": {k: _jsonable(v) for k, v in head.get_params().items()},
        "classes": _jsonable(head.classes_),
        "n_features_in": int(head.n_features_in_),
        "state": state,
    }


def head_from_dict(d: Mapping[str, Any]) -> _FusionHead:
    """Rebuild a fitted head from :func:`head_to_dict` output."""
    try:
        if d.get("format") != HEAD_FORMAT:
            raise ValueError(f"format is {d.get('format')!r}, expected {HEAD_FORMAT!r}")
        cls = HEADS[d["class"]]
        params = dict(d["params"])
        if cls is MLPFusionHead:
            params["hidden"] = tuple(params.get("hidden", (64,)))
        head = cls(**params)
        head.classes_ = np.asarray(d["classes"])
        head.n_features_in_ = int(d["n_features_in"])
        for k, v in d["state"].items():
            if k not in cls._state_keys:
                raise ValueError(f"unexpected state entry {k!r}")
            if k in ("coefs_", "intercepts_"):
                setattr(head, k, [np.asarray(a, dtype=np.float64) for a in v])
            elif k.startswith("tree_") and k != "tree_threshold_" and k != "tree_value_":
                setattr(head, k, np.asarray(v, dtype=np.int64))
            else:
                setattr(head, k, np.asarray(v, dtype=np.float64))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelBundleError(f"The model bundle's fusion head could not be rebuilt ({exc}); the bundle is damaged.") from exc
    return head
