"""Clinical variables (parsing, refusal, missing rules) and fusion heads (scikit-learn API, agreement
with scikit-learn references, learning a toy problem, serialisation without pickle)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit
from sklearn.base import clone, is_classifier
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

from BreastDLRLib.clinical import (
    ClinicalSchema,
    ClinicalVariable,
    MLPFusionHead,
    ScoreFusionHead,
    SVMFusionHead,
    _platt,
    from_json,
    head_from_dict,
    head_to_dict,
    parse_cli,
)
from BreastDLRLib.errors import ClinicalInputError, ModelBundleError

MANIFEST = [
    {"name": "age", "type": "number", "unit": "years", "valid_range": [18, 100], "missing": "impute_median",
     "median": 48, "description": "Age at examination"},
    {"name": "family_history", "type": "bool", "missing": "impute:no"},
    {"name": "shape", "type": "category", "categories": ["oval", "round", "irregular"], "missing": "indicator"},
    {"name": "size", "type": "number", "unit": "mm", "min": 0, "max": 200, "missing": "refuse"},
    {"name": "density", "type": "category", "categories": ["a", "b", "c", "d"], "encoding": "ordinal",
     "missing": "impute:b"},
]


@pytest.fixture()
def schema() -> ClinicalSchema:
    return ClinicalSchema.from_manifest({"variables": MANIFEST})


# ============================================================================ parsing
def test_full_values_encode_by_hand(schema):
    vec, notes = schema.parse({"age": 52, "family_history": True, "shape": "Irregular", "size": 12.5, "density": "c"})
    # age | family_history | shape one-hot (oval, round, irregular) + missing flag | size | density index
    np.testing.assert_array_equal(vec, [52, 1, 0, 0, 1, 0, 12.5, 2])
    assert notes == []
    assert schema.feature_names == ["age", "family_history", "shape=oval", "shape=round", "shape=irregular",
                                    "shape_missing", "size", "density"]
    assert schema.n_features == len(vec)


def test_cli_strings_are_converted(schema):
    vec, notes = schema.parse_cli(["Age=61", "family-history=yes", "shape=round", "size=8 mm", "density=A"])
    np.testing.assert_array_equal(vec, [61, 1, 0, 1, 0, 0, 8, 0])
    assert notes == []
    assert parse_cli(["age = 52", "x=a=b"]) == {"age": "52", "x": "a=b"}
    for token, expected in [("yes", 1), ("TRUE", 1), ("1", 1), ("y", 1), ("no", 0), ("false", 0), ("0", 0), ("N", 0)]:
        v, _ = schema.parse({"family_history": token, "size": 3})
        assert v[1] == expected, token


def test_missing_values_follow_each_declared_rule(schema):
    vec, notes = schema.parse({"size": "20"})
    np.testing.assert_array_equal(vec, [48, 0, 0, 0, 0, 1, 20, 1])
    assert "age missing: replaced by the training median 48 years" in notes
    assert "family_history missing: replaced by the model's default no" in notes
    assert any(n.startswith("shape missing: flagged as missing") for n in notes)
    assert "density missing: replaced by the model's default b" in notes
    assert len(notes) == 4
    # missing spelled in different ways
    for blank in ["", "NA", "unknown", None, float("nan")]:
        v, n = schema.parse({"age": blank, "size": 1})
        assert v[0] == 48 and n[0].startswith("age missing")


def test_refused_missing_value_names_the_variable(schema):
    with pytest.raises(ClinicalInputError, match=r"size is missing .* in mm \(valid range 0–200 mm\)"):
        schema.parse({"age": 50})
    with pytest.raises(ClinicalInputError, match="size is missing"):
        schema.parse_cli(["size="])


@pytest.mark.parametrize("values,pattern", [
    ({"age": 150, "size": 1}, r"^age = 150 years is outside the valid range 18–100 years"),
    ({"age": "17", "size": 1}, r"age = 17 years is outside the valid range 18–100 years"),
    ({"age": "fifty", "size": 1}, r"age = 'fifty' is not a number; enter age in years \(valid range 18–100 years\)"),
    ({"age": True, "size": 1}, r"age = True is not a number"),
    ({"age": "inf", "size": 1}, r"age = 'inf' is not a number"),
    ({"size": -1}, r"size = -1 mm is outside the valid range 0–200 mm"),
    ({"size": 1, "family_history": "maybe"}, r"family_history = 'maybe' is not yes or no"),
    ({"size": 1, "family_history": 2}, r"family_history = 2 is not yes or no"),
    ({"size": 1, "shape": "square"}, r"shape = 'square' is not one of the categories oval, round, irregular"),
    ({"size": 1, "agee": 50}, r"'agee' is not a clinical variable of this model \(did you mean age\?\); it uses: age,"),
    ({"size": 1, "Age": 50, "age": 51}, r"age is given twice"),
])
def test_bad_values_raise_clinical_input_error(schema, values, pattern):
    with pytest.raises(ClinicalInputError, match=pattern):
        schema.parse(values)


def test_cli_and_json_readers(schema, tmp_path):
    with pytest.raises(ClinicalInputError, match="name=value"):
        parse_cli(["age52"])
    with pytest.raises(ClinicalInputError, match="given twice"):
        parse_cli(["age=52", "age=53"])
    good = tmp_path / "clinical.json"
    good.write_text(json.dumps({"age": 52, "size": "14", "family_history": False}))
    vec, notes = schema.parse_json(good)
    np.testing.assert_array_equal(vec[[0, 1, 6]], [52, 0, 14])
    assert from_json(good)["size"] == "14"
    bad = tmp_path / "bad.json"
    bad.write_text("{age: 52")
    with pytest.raises(ClinicalInputError, match="bad.json"):
        schema.parse_json(bad)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ClinicalInputError, match="one JSON object"):
        from_json(listed)
    with pytest.raises(ClinicalInputError, match="missing.json"):
        from_json(tmp_path / "missing.json")


@pytest.mark.parametrize("entry,pattern", [
    ({"type": "number"}, "no name"),
    ({"name": "x", "type": "text"}, "type 'text'"),
    ({"name": "x", "type": "number", "valid_range": [5, 1]}, "empty valid range"),
    ({"name": "x", "type": "category"}, "without a list of categories"),
    ({"name": "x", "type": "number", "missing": "impute_median"}, "declares no median"),
    ({"name": "x", "type": "number", "valid_range": [0, 1], "missing": "impute:7"}, "invalid imputation"),
    ({"name": "x", "type": "bool", "missing": "guess"}, "missing rule 'guess'"),
])
def test_bad_manifest_entries_raise_model_bundle_error(entry, pattern):
    with pytest.raises(ModelBundleError, match=pattern):
        ClinicalVariable.from_dict(entry)


def test_duplicate_variable_and_round_trip_of_manifest(schema):
    with pytest.raises(ModelBundleError, match="twice"):
        ClinicalSchema([MANIFEST[0], MANIFEST[0]])
    again = ClinicalSchema.from_manifest(json.loads(json.dumps(schema.to_manifest())))
    values = {"age": 33, "shape": "oval", "size": 4}
    np.testing.assert_array_equal(again.parse(values)[0], schema.parse(values)[0])
    assert again.parse(values)[1] == schema.parse(values)[1]


def test_form_spec_describes_each_variable(schema):
    form = schema.to_form_spec()
    assert [f["name"] for f in form] == schema.names
    age, fh, shape, size, _ = form
    assert (age["widget"], age["min"], age["max"], age["unit"], age["required"]) == ("spinbox", 18, 100, "years", False)
    assert fh["widget"] == "checkbox" and shape["widget"] == "combobox"
    assert shape["categories"] == ["oval", "round", "irregular"]
    assert size["required"] is True and "0–200 mm" in size["help"]
    json.dumps(form)


# ============================================================================ fusion heads
def _toy(n: int = 160, d: int = 6, seed: int = 0, sep: float = 3.0):
    """Two Gaussian classes separated along the first two axes; the rest is noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, d))
    X[:, 0] += sep * y
    X[:, 1] -= 0.5 * sep * y
    X[:, 2:] *= 5.0  # different scales, so scaling matters
    return X, y


HEADS = [
    MLPFusionHead(hidden=(16,), alpha=1e-3),
    SVMFusionHead(C=1.0, kernel="rbf"),
    SVMFusionHead(C=0.5, kernel="linear"),
    ScoreFusionHead(method="logistic"),
    ScoreFusionHead(method="tree", max_depth=3),
]
IDS = ["mlp", "svm-rbf", "svm-linear", "logistic", "tree"]


@pytest.mark.parametrize("head", HEADS, ids=IDS)
def test_head_learns_a_separable_problem(head):
    X, y = _toy(seed=1)
    Xt, yt = _toy(seed=2)
    fitted = clone(head).fit(X, y)
    proba = fitted.predict_proba(Xt)
    assert proba.shape == (len(Xt), 2)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-12)
    assert roc_auc_score(yt, proba[:, 1]) > 0.9
    assert np.mean(fitted.predict(Xt) == yt) > 0.8
    assert set(fitted.predict(Xt)) <= {0, 1}


@pytest.mark.parametrize("head", HEADS, ids=IDS)
def test_head_sklearn_api(head):
    assert is_classifier(head)
    params = head.get_params()
    twin = clone(head)
    assert twin.get_params() == params and twin is not head
    twin.set_params(random_state=7)
    assert twin.get_params()["random_state"] == 7
    X, y = _toy(n=100, seed=3)
    with pytest.raises(NotFittedError):
        clone(head).predict_proba(X)
    scores = cross_val_score(make_pipeline(StandardScaler(), clone(head)), X, y, cv=3, scoring="roc_auc")
    assert scores.shape == (3,) and scores.mean() > 0.85
    fitted = clone(head).fit(X, y)
    with pytest.raises(ValueError, match="features"):
        fitted.predict_proba(X[:, :3])
    with pytest.raises(ValueError, match="two classes"):
        clone(head).fit(X, np.zeros(len(X)))


@pytest.mark.parametrize("head", HEADS, ids=IDS)
def test_serialisation_round_trip_without_pickle(head):
    X, y = _toy(n=120, seed=4)
    labels = np.where(y == 1, "malignant", "benign")
    fitted = clone(head).fit(X, labels)
    text = json.dumps(head_to_dict(fitted))  # plain JSON: lists, numbers, strings
    rebuilt = head_from_dict(json.loads(text))
    assert type(rebuilt) is type(fitted) and rebuilt.get_params() == fitted.get_params()
    Xt, _ = _toy(n=50, seed=5)
    np.testing.assert_array_equal(rebuilt.predict_proba(Xt), fitted.predict_proba(Xt))
    np.testing.assert_array_equal(rebuilt.predict(Xt), fitted.predict(Xt))
    assert list(rebuilt.classes_) == ["benign", "malignant"]


def test_head_from_damaged_dict_raises_model_bundle_error():
    d = head_to_dict(ScoreFusionHead().fit(*_toy(n=60)))
    for damage in [{"class": "Nope"}, {"format": "pickle"}, {"state": {"evil": [1]}}, {"params": {"bogus": 1}}]:
        with pytest.raises(ModelBundleError, match="fusion head"):
            head_from_dict({**d, **damage})


def test_mlp_head_matches_sklearn_mlp_on_standardised_input():
    X, y = _toy(seed=6)
    head = MLPFusionHead(hidden=(8, 4), alpha=1e-2, activation="tanh", random_state=3).fit(X, y)
    Xs = StandardScaler().fit(X)
    ref = MLPClassifier(hidden_layer_sizes=(8, 4), alpha=1e-2, activation="tanh", solver="lbfgs", max_iter=1000,
                        random_state=3).fit(Xs.transform(X), y)
    Xt, _ = _toy(n=40, seed=7)
    np.testing.assert_allclose(head.predict_proba(Xt), ref.predict_proba(Xs.transform(Xt)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kernel", ["linear", "rbf", "poly", "sigmoid"])
def test_svm_head_decision_matches_sklearn_svc(kernel):
    X, y = _toy(n=80, seed=8)
    head = SVMFusionHead(kernel=kernel, C=0.7, coef0=0.5, degree=2).fit(X, y)
    Xs = StandardScaler().fit(X)
    ref = SVC(kernel=kernel, C=0.7, gamma="scale", coef0=0.5, degree=2).fit(Xs.transform(X), y)
    Xt, _ = _toy(n=30, seed=9)
    np.testing.assert_allclose(head.decision_function(Xt), ref.decision_function(Xs.transform(Xt)), rtol=1e-7, atol=1e-9)
    # probability is an increasing function of the decision value (a > 0 on a learnable problem)
    order = np.argsort(head.decision_function(Xt))
    assert np.all(np.diff(head.predict_proba(Xt)[order, 1]) >= 0)


def test_platt_recovers_a_known_sigmoid():
    rng = np.random.default_rng(0)
    f = rng.uniform(-3, 3, 6000)
    y = rng.random(6000) < expit(2.0 * f - 1.0)
    a, b = _platt(f, y)
    assert a == pytest.approx(2.0, abs=0.2) and b == pytest.approx(-1.0, abs=0.15)


def test_score_heads_match_sklearn_references():
    X, y = _toy(n=150, d=2, seed=10)
    Xt, _ = _toy(n=60, d=2, seed=11)
    lr_head = ScoreFusionHead(method="logistic", C=0.3).fit(X, y)
    ref = LogisticRegression(C=0.3, max_iter=1000).fit(X, y)
    np.testing.assert_allclose(lr_head.predict_proba(Xt), ref.predict_proba(Xt), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lr_head.decision_function(Xt), ref.decision_function(Xt), rtol=1e-9, atol=1e-12)
    tree_head = ScoreFusionHead(method="tree", max_depth=4, min_samples_leaf=3, random_state=2).fit(X, y)
    tree_ref = DecisionTreeClassifier(max_depth=4, min_samples_leaf=3, random_state=2).fit(X, y)
    np.testing.assert_allclose(tree_head.predict_proba(Xt), tree_ref.predict_proba(Xt), rtol=1e-12)
    np.testing.assert_allclose(tree_head.predict_proba(X), tree_ref.predict_proba(X), rtol=1e-12)
    # probes just above each split threshold: scikit-learn compares in float32, so must we
    t = tree_ref.tree_
    paths = tree_ref.decision_path(X).toarray().astype(bool)
    probes = []
    for node in np.flatnonzero(t.children_left != -1):
        for x in (np.nextafter(t.threshold[node], np.inf), t.threshold[node] + 1e-9, t.threshold[node]):
            row = X[np.flatnonzero(paths[:, node])[0]].copy()  # a sample that reaches this node
            row[t.feature[node]] = x
            probes.append(row)
    probes = np.array(probes)
    np.testing.assert_array_equal(tree_head.predict_proba(probes), tree_ref.predict_proba(probes))
    assert not hasattr(tree_head, "decision_function")  # so Pipeline/scorers fall back to predict_proba
    with pytest.raises(ValueError, match="method"):
        ScoreFusionHead(method="forest").fit(X, y)


def test_three_class_heads_use_softmax_and_round_trip():
    rng = np.random.default_rng(12)
    y = rng.integers(0, 3, 150)
    X = rng.normal(size=(150, 3)) + 3.0 * np.eye(3)[y]
    for head in (MLPFusionHead(hidden=(8,)), ScoreFusionHead(method="logistic"), ScoreFusionHead(method="tree")):
        head.fit(X, y)
        p = head.predict_proba(X)
        assert p.shape == (150, 3) and np.mean(head.predict(X) == y) > 0.8
        np.testing.assert_array_equal(head_from_dict(json.loads(json.dumps(head_to_dict(head)))).predict_proba(X), p)
    with pytest.raises(ValueError, match="binary"):
        SVMFusionHead().fit(X, y)
