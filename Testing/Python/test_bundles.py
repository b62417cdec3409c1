"""Model bundles: safetensors + manifest + checksum; tampered or mismatched bundles are refused."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from BreastDLRLib.bundles import list_bundles, open_bundle, save_bundle, save_head_bundle, sha256_file, write_index
from BreastDLRLib.errors import ModelBundleError
from BreastDLRLib.networks.classifiers import build_classifier

COMMON = {"version": "1.0", "provenance": {}, "metrics": {}, "licence": "x", "intended_use": "tests",
          "input": {"size": [32, 32]}, "labels": ["a", "b"], "thresholds": {"probability": 0.5}}


@pytest.fixture()
def bundle_dir(tmp_path):
    torch.manual_seed(0)
    net = build_classifier("EmbeddingNet", backbone="resnet18", embedding_dim=8).eval()
    b = save_bundle(tmp_path / "models" / "clf", net, {**COMMON, "name": "clf", "role": "malignancy",
                                                        "architecture": "EmbeddingNet",
                                                        "arguments": {"backbone": "resnet18", "embedding_dim": 8}}, "card")
    return b.path, net


def test_round_trip_gives_the_same_network(bundle_dir):
    path, net = bundle_dir
    b = open_bundle(path)
    assert (path / "weights.safetensors").is_file() and (path / "MODEL_CARD.md").read_text() == "card"
    assert b.manifest["weights"]["sha256"] == sha256_file(path / "weights.safetensors")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(b.model()(x), net(x), atol=1e-6)


def test_half_precision_bundle_is_close(tmp_path, bundle_dir):
    _, net = bundle_dir
    b = save_bundle(tmp_path / "half", net, {**COMMON, "name": "h", "role": "risk", "architecture": "EmbeddingNet",
                                            "arguments": {"backbone": "resnet18", "embedding_dim": 8}}, "c", half=True)
    assert b.manifest["weights"]["dtype"] == "float16"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(torch.softmax(b.model()(x), 1), torch.softmax(net(x), 1), atol=2e-2)


def test_tampered_weights_are_refused(bundle_dir):
    path, _ = bundle_dir
    w = path / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelBundleError, match="checksum"):
        open_bundle(path)


def test_pickle_in_place_of_safetensors_is_refused(bundle_dir):
    path, net = bundle_dir
    w = path / "weights.safetensors"
    torch.save(net.state_dict(), w)  # a pickle file, even with a matching checksum in the manifest
    m = json.loads((path / "manifest.json").read_text())
    m["weights"]["sha256"] = sha256_file(w)
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelBundleError, match="cannot be read"):
        open_bundle(path).model()


def test_manifest_that_does_not_fit_the_weights_is_refused(bundle_dir):
    path, _ = bundle_dir
    m = json.loads((path / "manifest.json").read_text())
    m["arguments"]["embedding_dim"] = 16
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelBundleError, match="do not match"):
        open_bundle(path).model()
    m["architecture"] = "NoSuchNet"
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelBundleError, match="NoSuchNet"):
        open_bundle(path).model()


def test_edited_manifest_caught_by_the_index(bundle_dir):
    path, _ = bundle_dir
    write_index(path.parent)
    open_bundle(path)  # untouched: fine
    m = json.loads((path / "manifest.json").read_text())
    m["thresholds"]["probability"] = 0.05
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelBundleError, match="changed after it was released"):
        open_bundle(path)


@pytest.mark.parametrize("damage,match", [
    (lambda p: (p / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda p: (p / "manifest.json").write_text("{not json"), "not valid JSON"),
    (lambda p: (p / "manifest.json").write_text(json.dumps({"format": "other/9"})), "other/9"),
    (lambda p: (p / "weights.safetensors").unlink(), "weights file"),
])
def test_broken_bundles_have_clear_errors(bundle_dir, damage, match):
    path, _ = bundle_dir
    damage(path)
    with pytest.raises(ModelBundleError, match=match):
        open_bundle(path)


def test_missing_checksum_refused(bundle_dir):
    path, _ = bundle_dir
    m = json.loads((path / "manifest.json").read_text())
    del m["weights"]["sha256"]
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelBundleError, match="sha256"):
        open_bundle(path)


def test_head_bundle_round_trip(tmp_path):
    from BreastDLRLib.clinical import ScoreFusionHead, head_to_dict

    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 2))
    y = (X[:, 0] + 0.3 * rng.normal(size=80) > 0).astype(int)
    head = ScoreFusionHead(method="logistic").fit(X, y)
    b = save_head_bundle(tmp_path / "fusion", head_to_dict(head), {**COMMON, "name": "f", "role": "fusion",
                                                                   "architecture": "ScoreFusionHead", "arguments": {}}, "c")
    assert b.is_head
    np.testing.assert_allclose(open_bundle(b.path).model().predict_proba(X), head.predict_proba(X))


def test_list_bundles_finds_extra_dirs(bundle_dir):
    path, _ = bundle_dir
    found = [b for b in list_bundles([path.parent]) if b["path"] == str(path)]
    assert found and found[0]["role"] == "malignancy"
    shutil.rmtree(path)
    assert not [b for b in list_bundles([path.parent]) if b["path"] == str(path)]


def _member(folder, seed):
    torch.manual_seed(seed)
    net = build_classifier("EmbeddingNet", backbone="resnet18", embedding_dim=8).eval()
    b = save_bundle(folder, net, {**COMMON, "name": folder.name, "role": "malignancy", "architecture": "EmbeddingNet",
                                  "arguments": {"backbone": "resnet18", "embedding_dim": 8}}, "card", half=True)
    return b, net


def test_ensemble_bundle_averages_its_members_and_keeps_the_first_file(tmp_path):
    from BreastDLRLib.bundles import save_ensemble_bundle

    (b0, n0), (b1, n1) = _member(tmp_path / "m0", 0), _member(tmp_path / "m1", 1)
    first_bytes = (b0.path / "weights.safetensors").read_bytes()
    ens = save_ensemble_bundle(tmp_path / "ens", [b0.path, b1.path],
                               {**COMMON, "name": "ens", "role": "malignancy"}, "ensemble card")
    assert (ens.path / "weights.safetensors").read_bytes() == first_bytes       # byte for byte
    assert [p["file"] for p in ens.manifest["weights"]["parts"]] == ["member-1.safetensors"]
    assert ens.manifest["arguments"] == {"member_architecture": "EmbeddingNet",
                                         "member_arguments": {"backbone": "resnet18", "embedding_dim": 8}, "n_members": 2}
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        p = torch.softmax(ens.model()(x), 1)
        want = (torch.softmax(b0.model()(x), 1) + torch.softmax(b1.model()(x), 1)) / 2
        torch.testing.assert_close(p, want, atol=1e-6, rtol=1e-5)
        assert ens.model().embed(x).shape == (3, 16)
    assert len(ens.model().feature_layers()["image"]) == 2


def test_ensemble_bundle_refuses_a_tampered_or_missing_part(tmp_path):
    from BreastDLRLib.bundles import save_ensemble_bundle

    (b0, _), (b1, _) = _member(tmp_path / "m0", 0), _member(tmp_path / "m1", 1)
    ens = save_ensemble_bundle(tmp_path / "ens", [b0.path, b1.path], {**COMMON, "name": "ens", "role": "malignancy"}, "c")
    part = ens.path / "member-1.safetensors"
    data = bytearray(part.read_bytes())
    data[-1] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(ModelBundleError, match="member-1.safetensors does not match its checksum"):
        open_bundle(ens.path)
    part.unlink()
    with pytest.raises(ModelBundleError, match="member-1.safetensors is missing"):
        open_bundle(ens.path)
    m = json.loads((ens.path / "manifest.json").read_text())
    m["weights"]["parts"] = [{"file": "../m1/weights.safetensors", "sha256": "0" * 64}]
    (ens.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelBundleError, match="cannot be verified"):
        open_bundle(ens.path)


def test_ensemble_members_must_match(tmp_path):
    from BreastDLRLib.bundles import save_ensemble_bundle

    b0, _ = _member(tmp_path / "m0", 0)
    other = save_bundle(tmp_path / "m1", build_classifier("EmbeddingNet", backbone="resnet18", embedding_dim=4),
                        {**COMMON, "name": "m1", "role": "malignancy", "architecture": "EmbeddingNet",
                         "arguments": {"backbone": "resnet18", "embedding_dim": 4}}, "card")
    with pytest.raises(ModelBundleError, match="must match"):
        save_ensemble_bundle(tmp_path / "ens", [b0.path, other.path], {**COMMON, "name": "e", "role": "malignancy"}, "c")
    assert not (tmp_path / "ens").exists()


def test_saving_into_an_indexed_models_folder_updates_its_index(bundle_dir):
    """Re-releasing a bundle into a folder with models.json (as the retrain script does in Resources/Models)
    refreshes the index, so the new bundle opens; an edit by hand is still refused."""
    path, net = bundle_dir
    write_index(path.parent)
    m = json.loads((path / "manifest.json").read_text())
    fields = {k: v for k, v in m.items() if k not in ("weights", "format")}
    b = save_bundle(path, net, {**fields, "version": "2.0"}, "card")
    assert b.version == "2.0"
    index = json.loads((path.parent / "models.json").read_text())
    assert [e["version"] for e in index["models"] if e["folder"] == "clf"] == ["2.0"]
    m = json.loads((path / "manifest.json").read_text())
    m["thresholds"]["probability"] = 0.01
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelBundleError, match="changed after it was released"):
        open_bundle(path)
    # releasing another bundle into the folder re-lists that one only: the edited manifest stays refused
    torch.manual_seed(1)
    other = build_classifier("EmbeddingNet", backbone="resnet18", embedding_dim=8)
    save_bundle(path.parent / "other", other, {**fields, "name": "other"}, "card")
    assert {e["folder"] for e in json.loads((path.parent / "models.json").read_text())["models"]} == {"clf", "other"}
    with pytest.raises(ModelBundleError, match="changed after it was released"):
        open_bundle(path)


# ------------------------------------------------------------------------------- one trunk for two models
def _pair(folder, seed=0, other_seed=None):
    """BM and LH split from one two-task network (as train_classifier --task both writes them), fp16."""
    from BreastDLRLib.training.classifier import task_model

    torch.manual_seed(seed)
    joint = build_classifier("EmbeddingNet", backbone="resnet18", embedding_dim=8, num_classes=4).eval()
    args = {"backbone": "resnet18", "embedding_dim": 8}
    bm = save_bundle(folder / "bm", task_model(joint, 0), {**COMMON, "name": "bm", "role": "malignancy",
                                                           "architecture": "EmbeddingNet", "arguments": args}, "card", half=True)
    if other_seed is not None:
        torch.manual_seed(other_seed)
        joint = build_classifier("EmbeddingNet", backbone="resnet18", embedding_dim=8, num_classes=4).eval()
    lh = save_bundle(folder / "lh", task_model(joint, 1), {**COMMON, "name": "lh", "role": "risk",
                                                           "architecture": "EmbeddingNet", "arguments": args}, "card lh", half=True)
    return bm.path, lh.path


def test_shared_trunk_is_stored_once_and_builds_the_same_network(tmp_path):
    from BreastDLRLib.bundles import share_weights

    bm, lh = _pair(tmp_path / "models")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = open_bundle(lh).model()(x)
    big = (lh / "weights.safetensors").stat().st_size
    b = share_weights(bm, lh)
    assert (lh / "weights.safetensors").stat().st_size < big / 100          # only its last layer is its own
    part = b.manifest["weights"]["parts"][0]
    assert part["bundle"] == "bm" and part["sha256"] == sha256_file(bm / "weights.safetensors")
    assert part["only"] == ["embedding.", "trunk."] and b.manifest["uses_weights_of"] == "bm"
    assert (lh / "MODEL_CARD.md").read_text() == "card lh"
    with torch.no_grad():
        assert torch.equal(open_bundle(lh).model()(x), before)


def test_a_shared_trunk_that_is_missing_or_replaced_is_refused(tmp_path):
    from BreastDLRLib.bundles import share_weights

    bm, lh = _pair(tmp_path / "models")
    share_weights(bm, lh)
    data = bytearray((bm / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bm / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelBundleError, match="of the model 'bm', whose trunk it uses, does not match"):
        open_bundle(lh)
    shutil.rmtree(bm)
    with pytest.raises(ModelBundleError, match="install 'bm' in the same folder"):
        open_bundle(lh)


@pytest.mark.parametrize("part", [{"bundle": "../x", "only": ["trunk."]}, {"bundle": "bm", "only": []},
                                  {"bundle": "bm"}, {"bundle": "bm", "only": [""]}])
def test_bad_shared_parts_are_refused(tmp_path, part):
    from BreastDLRLib.bundles import share_weights

    bm, lh = _pair(tmp_path / "models")
    share_weights(bm, lh)
    m = json.loads((lh / "manifest.json").read_text())
    m["weights"]["parts"][0] = {**{k: v for k, v in m["weights"]["parts"][0].items() if k not in ("bundle", "only")}, **part}
    (lh / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelBundleError, match="weights part"):
        open_bundle(lh)


def test_models_without_a_common_trunk_do_not_share(tmp_path):
    from BreastDLRLib.bundles import share_weights

    bm, lh = _pair(tmp_path / "models", seed=0, other_seed=1)
    with pytest.raises(ModelBundleError, match="no module in common"):
        share_weights(bm, lh)
    bm2, _ = _pair(tmp_path / "elsewhere")
    with pytest.raises(ModelBundleError, match="its own folder"):
        share_weights(bm2, lh)


def test_a_model_with_a_shared_trunk_is_imported_with_its_sibling_and_is_no_ensemble_member(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "BreastDLR"))
    from BreastDLRSlicerLib import models as slicer_models  # the module's plain-Python helpers (no Qt)
    from BreastDLRLib.bundles import save_ensemble_bundle, share_weights

    bm, lh = _pair(tmp_path / "models")
    share_weights(bm, lh)
    dest = tmp_path / "user"
    copied = slicer_models.import_bundle(lh, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["bm", "lh"]
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(open_bundle(copied).model()(x), open_bundle(lh).model()(x))
    with pytest.raises(ModelBundleError, match="must have one role"):
        save_ensemble_bundle(tmp_path / "ens", [bm, lh], {**COMMON, "name": "e", "role": "risk"}, "card")


def _ensemble_pair(folder, tmp_path):
    """Malignancy and risk ensembles of two pairs written by --task both (other seeds), trunks stored once."""
    from BreastDLRLib.bundles import save_ensemble_bundle, share_weights

    pairs = [_pair(tmp_path / f"pair{s}", seed=s) for s in (0, 1)]
    for _, lh in pairs:
        share_weights(lh.parent / "bm", lh)                           # as --task both releases them
    bm = save_ensemble_bundle(folder / "bm", [p[0] for p in pairs], {**COMMON, "name": "bm", "role": "malignancy"}, "c")
    lh = save_ensemble_bundle(folder / "lh", [p[1] for p in pairs], {**COMMON, "name": "lh", "role": "risk"}, "c lh")
    return bm.path, lh.path, pairs


def test_two_ensembles_of_pairs_store_each_trunk_once_and_build_the_same_networks(tmp_path):
    from BreastDLRLib.bundles import share_weights, weight_files

    bm, lh, pairs = _ensemble_pair(tmp_path / "models", tmp_path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        whole = open_bundle(lh).model()(x)                            # the risk ensemble written whole
        want = (torch.softmax(open_bundle(pairs[0][1]).model()(x), 1) + torch.softmax(open_bundle(pairs[1][1]).model()(x), 1)) / 2
    torch.testing.assert_close(torch.softmax(whole, 1), want, atol=1e-6, rtol=1e-5)
    big = (lh / "weights.safetensors").stat().st_size + (lh / "member-1.safetensors").stat().st_size
    b = share_weights(bm, lh)
    assert not (lh / "member-1.safetensors").exists()                # its own tensors lie in one small file
    assert (lh / "weights.safetensors").stat().st_size < big / 100
    parts = b.manifest["weights"]["parts"]
    assert [(p["file"], p.get("prefix", ""), p["only"]) for p in parts] == [
        ("weights.safetensors", "members.0.", ["embedding.", "trunk."]),
        ("member-1.safetensors", "members.1.", ["embedding.", "trunk."])]
    assert [p["sha256"] for p in parts] == [wf.sha256 for wf in weight_files(open_bundle(bm).manifest)]
    with torch.no_grad():
        assert torch.equal(open_bundle(lh).model()(x), whole)
    data = bytearray((bm / "member-1.safetensors").read_bytes())     # the second member's trunk altered
    data[-1] ^= 0xFF
    (bm / "member-1.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelBundleError, match="of the model 'bm', whose trunk it uses, does not match"):
        open_bundle(lh)


def test_ensembles_of_unrelated_members_share_only_what_is_identical(tmp_path):
    """A risk ensemble whose second member was trained on another trunk shares the first member's trunk only."""
    from BreastDLRLib.bundles import save_ensemble_bundle, share_weights

    p0, p1 = _pair(tmp_path / "pair0", seed=0), _pair(tmp_path / "pair1", seed=1, other_seed=2)
    bm = save_ensemble_bundle(tmp_path / "models" / "bm", [p0[0], p1[0]], {**COMMON, "name": "bm", "role": "malignancy"}, "c")
    lh = save_ensemble_bundle(tmp_path / "models" / "lh", [p0[1], p1[1]], {**COMMON, "name": "lh", "role": "risk"}, "c")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = open_bundle(lh.path).model()(x)
    b = share_weights(bm.path, lh.path)
    assert [p["file"] for p in b.manifest["weights"]["parts"]] == ["weights.safetensors"]
    with torch.no_grad():
        assert torch.equal(open_bundle(lh.path).model()(x), before)
