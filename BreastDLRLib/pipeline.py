"""The one pipeline every caller uses: segment → lesions → planes → classify → explain → recommend.

The CLI (``segment``, ``analyze``, ``predict``), the Slicer worker, batch runs and training's validation all
go through :class:`Pipeline`; a caller that needs a different path adds an option here.  Writing files is
in :mod:`BreastDLRLib.outputs`; this module computes and returns plain results.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .bundles import Bundle, default_bundle, list_bundles, open_bundle
from .errors import ClinicalInputError, InputError, ModelBundleError
from .lesions import Lesion, find_lesions
from .progress import CancelCheck, ProgressCallback, check_cancel, no_progress
from .segmentation import SliceSegmenter, resolve_device
from .volume import Volume

@dataclass
class LesionResult:
    lesion: Lesion
    probabilities: Dict[str, Optional[float]] = field(default_factory=dict)
    frame_probabilities: Dict[str, List[float]] = field(default_factory=dict)
    thresholds: Dict[str, float] = field(default_factory=dict)
    recommendation: Optional[Any] = None          # recommend.Recommendation
    crops: Dict[str, Any] = field(default_factory=dict, repr=False)   # plane -> [PlaneCrop]
    cams: Dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    embedding: Optional[np.ndarray] = field(default=None, repr=False)
    heatmap_class: Optional[str] = None            # the class Grad-CAM explains (the model's decision)
    notes: List[str] = field(default_factory=list)  # what the reader should know about this lesion's scores
    outline: str = "segmenter"                     # who drew the outline: "segmenter" or "reader"
    outline_uncertain: bool = False                # the segmenter was unsure of its outline: check it before trusting
    features: Dict[str, float] = field(default_factory=dict)   # handcrafted outline features, when measured


@dataclass
class Analysis:
    volume: Volume
    probability: Volume
    labels: Volume
    lesions: List[LesionResult]
    heatmap: Optional[Volume]
    models: List[Dict[str, Any]]
    clinical: Dict[str, Any] = field(default_factory=dict)
    clinical_notes: List[str] = field(default_factory=list)
    birads: Optional[str] = None
    timings: Dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"
    segmentation_tta: Tuple[str, ...] = ()  # the segmenter's test-time augmentation (("hflip",) on single images)


class Pipeline:
    """Holds verified model bundles and runs them on volumes.

    ``Pipeline.from_paths(paths)`` takes any bundle folders (their manifest says their role) and the shipped
    defaults for the roles not given.  ``bf16=None`` follows each bundle's measured setting.
    """

    def __init__(self, bundles: Mapping[str, Bundle], device: str = "auto", bf16: Optional[bool] = None,
                 batch_size: int = 16):
        if "segmenter" not in bundles:
            raise ModelBundleError("No lesion segmenter model was given or installed; reinstall BreastDLR or give a "
                                   "segmenter bundle (--model on the command line, 'Import model…' in Slicer).")
        self.bundles = dict(bundles)
        self.device = resolve_device(device)
        self.bf16 = bf16
        self.batch_size = batch_size
        self._segmenter: Optional[SliceSegmenter] = None
        self._risk_on_trunk: Optional[bool] = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_paths(cls, paths: Optional[Sequence[str]] = None, device: str = "auto", roles: Sequence[str] = ("segmenter",),
                   optional_roles: Sequence[str] = (), **kw: Any) -> "Pipeline":
        """Bundles from ``paths`` (by their declared role) plus shipped defaults for ``roles`` (required) and
        ``optional_roles`` (used when installed)."""
        bundles: Dict[str, Bundle] = {}
        for p in paths or ():
            b = open_bundle(p)
            if b.role in bundles:
                raise ModelBundleError(f"Two {b.role} models were given ({bundles[b.role].name} and {b.name}); pass one.")
            bundles[b.role] = b
        for role in roles:
            if role not in bundles:
                bundles[role] = default_bundle(role)
        installed = {b["role"] for b in list_bundles()}
        for role in optional_roles:
            # an optional model that is not installed is left out; one that is installed but fails its checks (a
            # damaged file, a missing sibling) is an error, never silently dropped
            if role not in bundles and role in installed:
                bundles[role] = default_bundle(role)
        return cls(bundles, device=device, **kw)

    def models(self) -> List[Dict[str, Any]]:
        return [b.describe() for b in self.bundles.values()]

    @property
    def segmenter(self) -> SliceSegmenter:
        if self._segmenter is None:
            self._segmenter = SliceSegmenter.from_bundle(self.bundles["segmenter"], device=str(self.device),
                                                         batch_size=self.batch_size, bf16=self.bf16)
        return self._segmenter

    @property
    def risk_shares_trunk(self) -> bool:
        """Whether the risk model takes its trunk from the 2D malignancy model's very weights files (a pair written
        by ``train_classifier.py --task both``, or two ensembles of such pairs) and reads the same crops: the
        trunks then run once for both."""
        if self._risk_on_trunk is None:
            from .bundles import weight_files

            bm, lh = self.bundles.get("malignancy"), self.bundles.get("risk")
            self._risk_on_trunk = False
            if bm is not None and lh is not None and self._model_input(bm) == self._model_input(lh):
                arch, args = bm.manifest["architecture"], bm.manifest["arguments"]
                networks = arch == "EmbeddingNet" or (arch == "EnsembleNet"
                                                      and args.get("member_architecture") == "EmbeddingNet")
                taken = [wf for wf in weight_files(lh.manifest) if wf.bundle]
                # the same sha256 is the same trunk, wherever the file lies; the prefix pairs the members
                self._risk_on_trunk = bool(
                    networks and (lh.manifest["architecture"], lh.manifest["arguments"]) == (arch, args)
                    and all(any(t.sha256 == wf.sha256 and t.prefix == wf.prefix and {"trunk.", "embedding."} <= set(t.only)
                                for t in taken) for wf in weight_files(bm.manifest)))
        return self._risk_on_trunk

    def clinical_schema(self):
        """The clinical variables the loaded models declare (union, first declaration wins)."""
        from .clinical import ClinicalSchema

        seen: Dict[str, Dict[str, Any]] = {}
        for b in self.bundles.values():
            for v in b.clinical_variables:
                seen.setdefault(v["name"], v)
        return ClinicalSchema(list(seen.values()))

    # ------------------------------------------------------------------ stages
    def segment(self, volume: Volume, progress: ProgressCallback = no_progress,
                cancel: Optional[CancelCheck] = None) -> Analysis:
        """Segmentation and lesion measurement only."""
        volume.validate()
        t0 = time.perf_counter()
        seg = self.segmenter(volume, progress=progress, cancel=cancel)
        t1 = time.perf_counter()
        th = self.bundles["segmenter"].thresholds
        known = volume.metadata.get("spacing_source") != "unknown"   # else every "mm" is a pixel
        min_fraction = 0.0 if known else th.get("min_lesion_fraction", 0.0)
        labels, lesions = find_lesions(seg.probability, threshold=th.get("probability", 0.5),
                                       min_size_mm3=th.get("min_lesion_mm3", 1.0),
                                       min_size_mm2=th.get("min_lesion_mm2", 2.0), min_fraction=min_fraction,
                                       min_extent_mm=th.get("min_lesion_extent_mm", 0.0) if known else 0.0)
        t2 = time.perf_counter()
        timings = {"segment_" + k: v for k, v in seg.timings.items()}
        timings.update({"segment_total": t1 - t0, "lesions": t2 - t1})
        results = [LesionResult(l) for l in lesions]
        check = th.get("uncertain_outline_below")
        if check is not None and volume.is_2d:
            for lr in results:
                self._check_outline(lr, float(check))
        return Analysis(volume, seg.probability, labels, results, None, self.models(),
                        timings=timings, precision=seg.precision, segmentation_tta=tuple(seg.test_time_augmentation))

    @staticmethod
    def _check_outline(lr: LesionResult, below: float) -> None:
        """Flag a segmenter outline whose mean lesion probability is under ``below`` (the segmenter manifest's
        ``thresholds.uncertain_outline_below``, measured on held-out 2D images, where flagged outlines often miss
        part of the lesion and the scores are less reliable; see the segmenter's model card)."""
        p = lr.lesion.mean_probability
        if p is None or not p < below:
            return
        lr.outline_uncertain = True
        lr.notes.append(f"Lesion {lr.lesion.id}: the automatic outline is uncertain (mean lesion probability {p:.3f}, "
                        f"below {below:g}). It may miss part of the lesion, and the scores rest on it: check the "
                        "outline and correct it (Segment Editor, or --outline with a mask) to have it scored as yours.")

    def reader_outline(self, volume: Volume, outline: Volume, source: str = "reader") -> Analysis:
        """Lesions from a given outline (a label map on ``volume``'s grid: each connected region of non-zero
        voxels is one lesion) instead of the segmenter's; they are marked ``outline=source``: ``"reader"``, or
        ``"segmenter"`` for BreastDLR's own segmentation handed back unedited."""
        if source not in ("reader", "segmenter"):
            raise ValueError(f"outline source must be 'reader' or 'segmenter', not {source!r}")
        from scipy import ndimage

        from .lesions import lesions_from_labels

        volume.validate()
        arr = np.asarray(outline.array)
        if arr.shape != volume.shape:
            raise InputError(f"The lesion outline has {arr.shape[::-1]} voxels (i, j, k) but the image has "
                             f"{volume.shape[::-1]}; it was drawn on another image.")
        if not np.any(arr > 0):
            raise InputError("The lesion outline is empty: no lesion is drawn in it. Draw the lesion or leave the "
                             "outline out to let the segmenter find it.")
        t0 = time.perf_counter()
        labels, _ = ndimage.label(arr > 0)
        lab_vol = volume.with_array(labels.astype(np.uint16))
        lesions = sorted(lesions_from_labels(lab_vol), key=lambda l: -l.voxels)
        order = {les.id: n + 1 for n, les in enumerate(lesions)}      # largest first, as the segmenter's
        relabelled = np.zeros(labels.shape, dtype=np.uint16)
        for les in lesions:
            relabelled[labels == les.id] = order[les.id]
            les.id = order[les.id]
        return Analysis(volume, volume.with_array((relabelled > 0).astype(np.float32)), volume.with_array(relabelled),
                        [LesionResult(l, outline=source) for l in lesions], None, self.models(),
                        timings={"lesions": time.perf_counter() - t0})

    def analyze(self, volume: Volume, clinical: Optional[Mapping[str, Any]] = None, birads: Optional[str] = None,
                explain: bool = True, progress: ProgressCallback = no_progress,
                cancel: Optional[CancelCheck] = None, outline: Optional[Volume] = None,
                outline_source: str = "reader") -> Analysis:
        """Segment (or take the given ``outline``, drawn by ``outline_source``), then classify, explain and
        recommend for every lesion."""
        from .recommend import normalise_birads

        birads_n = normalise_birads(birads) if birads else None
        schema = self.clinical_schema()
        cleaned, notes = self.parse_clinical(schema, clinical or {})
        outline_notes = []
        if outline is not None:
            result = self.reader_outline(volume, outline, outline_source)
            progress("segment", 0.6, f"{len(result.lesions)} lesion(s) in the outline given")
            if outline_source == "segmenter":
                outline_notes.append("The lesion outline given is BreastDLR's own automatic segmentation, unedited: it "
                                     "was scored as the segmenter's outline, without the morphology models. Correct it "
                                     "in the Segment Editor to have it scored as your outline.")
        else:
            result = self.segment(volume, progress=lambda s, f, m="": progress("segment", 0.6 * f, m), cancel=cancel)
        result.clinical, result.clinical_notes, result.birads = cleaned, notes + outline_notes, birads_n
        heat = np.zeros(volume.shape, dtype=np.float32) if explain else None
        t0 = time.perf_counter()
        timing = {"crops": 0.0, "classify": 0.0, "explain": 0.0}
        n = len(result.lesions)
        for idx, lr in enumerate(result.lesions):
            check_cancel(cancel)
            progress("classify", 0.6 + 0.4 * idx / max(n, 1), f"lesion {idx + 1} of {n}")
            self.classify_lesion(volume, lr, schema, cleaned, birads_n, heat, timing)
        progress("classify", 1.0, f"{n} lesion(s) analysed")
        if notes and result.lesions and not self._clinical_used(result.lesions):
            # how a missing value would have been filled does not matter when no model used the clinical values
            result.clinical_notes = [x for x in result.clinical_notes if x not in notes]
        for note in dict.fromkeys(x for lr in result.lesions for x in lr.notes):
            result.clinical_notes.append(note)
        result.timings.update(timing)
        result.timings["classify_total"] = time.perf_counter() - t0
        if heat is not None:
            result.heatmap = volume.with_array(heat)
        return result

    # ------------------------------------------------------------------ helpers
    def _clinical_used(self, lesions: Sequence[LesionResult]) -> bool:
        """Whether any model consumed the clinical values: a clinical fusion head that was applied, or any other
        model that declares clinical variables."""
        others = [b for b in self.bundles.values() if b.clinical_variables and b.role != "fusion"]
        return bool(others) or any(lr.probabilities.get("malignancy_fused") is not None for lr in lesions)

    @staticmethod
    def parse_clinical(schema, values: Mapping[str, Any]):
        """Checked clinical values {name: value|None} and the notes on missing ones."""
        if not schema.variables:
            if values:
                raise ClinicalInputError(
                    f"The loaded models use no clinical information, but {', '.join(values)} was given; "
                    "remove it or choose a model that uses it."
                )
            return {}, []
        cleaned = schema.parse_values(values)
        _, notes = schema.encode(cleaned)
        return cleaned, notes

    @staticmethod
    def decision_probability(lr: LesionResult) -> Optional[float]:
        """The malignancy probability decisions use (:func:`BreastDLRLib.recommend.decision_scores`)."""
        from .recommend import decision_scores

        return decision_scores(lr.probabilities)[0]

    @staticmethod
    def risk_probability(lr: LesionResult) -> Optional[float]:
        """The BI-RADS risk probability decisions use (:func:`BreastDLRLib.recommend.decision_scores`)."""
        from .recommend import decision_scores

        return decision_scores(lr.probabilities)[1]

    def _model_input(self, bundle: Bundle) -> Dict[str, Any]:
        inp = bundle.input
        size = inp.get("size", 224)
        return {"size": int(size[0] if isinstance(size, (list, tuple)) else size),
                "margin": float(inp.get("margin", 0.3)), "n_frames": int(inp.get("frames", 1)),
                "margin_of": str(inp.get("margin_of", "shorter")),
                "tta": tuple(inp.get("test_time_augmentation", ()))}

    def whole_image_lesion(self, volume: Volume) -> LesionResult:
        """A pseudo-lesion covering the whole image, for classifying an image whose lesion was not found."""
        from .lesions import lesions_from_labels

        (les,) = lesions_from_labels(volume.with_array(np.ones(volume.shape, dtype=np.uint8)))
        return LesionResult(les)

    def classify_lesion(self, volume: Volume, lr: LesionResult, schema=None, cleaned: Optional[Mapping[str, Any]] = None,
                        birads: Optional[str] = None, heat: Optional[np.ndarray] = None,
                        timing: Optional[Dict[str, float]] = None) -> LesionResult:
        """Fill ``lr`` with probabilities (image, fused), Grad-CAM (painted into ``heat``) and the recommendation."""
        from .recommend import recommend

        schema = schema if schema is not None else self.clinical_schema()
        timing = timing if timing is not None else {"crops": 0.0, "classify": 0.0, "explain": 0.0}
        self._classify(volume, lr, schema, cleaned or {}, heat, timing)
        lr.recommendation = recommend(
            birads, self.risk_probability(lr), self.decision_probability(lr),
            risk_threshold=lr.thresholds.get("high_risk", 0.5),
            malignancy_threshold=lr.thresholds.get("malignancy", 0.5),
        )
        return lr

    def _classify(self, volume: Volume, lr: LesionResult, schema, cleaned, heat, timing) -> None:
        from .explain import gradcam_planes, heatmap_to_volume
        from .networks.classifiers import predict_frames, predict_frames_shared
        from .planes import available_planes, crop_planes

        les = lr.lesion
        is_3d = len(available_planes(volume)) == 3
        mal_role = "abvs-malignancy" if (is_3d and "abvs-malignancy" in self.bundles) else "malignancy"
        explained = False
        shared = mal_role == "malignancy" and self.risk_shares_trunk
        risk_pred = None                              # the risk model's prediction, when made on the shared trunk
        for role, key in ((mal_role, "malignancy"), ("risk", "high_risk")):
            b = self.bundles.get(role)
            if b is None:
                lr.probabilities.setdefault(key, None)
                continue
            t = time.perf_counter()
            if key == "high_risk" and risk_pred is not None:
                lr.probabilities[key] = float(risk_pred.probability)
                lr.frame_probabilities[key] = [float(x) for x in risk_pred.frame_probabilities]
                lr.thresholds[key] = float(b.thresholds.get("probability", 0.5))
                continue
            spec = self._model_input(b)
            arch = b.manifest["architecture"]
            planes = ("transverse", "sagittal", "coronal") if arch == "ThreePlaneFusion" else ("transverse",)
            crops = crop_planes(volume, les.bbox_kji, les.centre_kji, size=spec["size"], margin=spec["margin"],
                                margin_of=spec["margin_of"], n_frames=spec["n_frames"], mask=les.mask, planes=planes)
            if key == "malignancy":
                lr.crops = crops
            timing["crops"] += time.perf_counter() - t
            t = time.perf_counter()
            model = b.model(str(self.device))
            inputs = {p: torch.from_numpy(np.stack([c.image for c in crops[p]])[:, None].repeat(3, 1)).float().to(self.device)
                      for p in crops}
            frames = inputs if arch == "ThreePlaneFusion" else inputs["transverse"]
            embedded: List[Any] = []                  # the shared trunk's embeddings, kept from its one pass
            if key == "malignancy" and shared:
                lh = self.bundles["risk"]
                pred, risk_pred = predict_frames_shared(
                    model, [model.classifier, lh.model(str(self.device)).classifier], frames,
                    [b.thresholds.get("probability", 0.5), lh.thresholds.get("probability", 0.5)], tta=spec["tta"],
                    embeddings=embedded)
            elif key == "malignancy" and hasattr(model, "embed") and hasattr(model, "classifier"):
                # its own classification layer on the kept embeddings: the prediction and the embedding in one pass
                (pred,) = predict_frames_shared(model, [model.classifier], frames, [b.thresholds.get("probability", 0.5)],
                                                tta=spec["tta"], embeddings=embedded)
            else:
                pred = predict_frames(model, frames, threshold=b.thresholds.get("probability", 0.5), tta=spec["tta"])
            lr.probabilities[key] = float(pred.probability)
            lr.frame_probabilities[key] = [float(x) for x in pred.frame_probabilities]
            lr.thresholds[key] = float(b.thresholds.get("probability", 0.5))
            if key == "malignancy" and embedded:
                lr.embedding = torch.cat(embedded).float().mean(0).cpu().numpy()
            elif key == "malignancy" and hasattr(model, "embed"):   # e.g. an ensemble of three-plane networks
                with torch.no_grad():
                    lr.embedding = model.embed(frames).float().mean(0).cpu().numpy()
            timing["classify"] += time.perf_counter() - t
            if key == "malignancy" and heat is not None and not explained:
                t = time.perf_counter()
                centre = {p: v[len(v) // 2: len(v) // 2 + 1] for p, v in inputs.items()}
                if arch == "ThreePlaneFusion":
                    net, layers = model, model.feature_layers()
                else:
                    net, layers = _DictInput(model), {"transverse": model.feature_layers()["image"]}
                # explain the decision the model made: the malignant class when it called the lesion malignant,
                # the benign class otherwise (Grad-CAM of an unchosen class is mostly empty)
                lr.heatmap_class = "malignant" if pred.malignant else "benign"
                lr.cams = gradcam_planes(net, centre, layers, target_class=int(pred.malignant), planes=tuple(centre))
                heatmap_to_volume(volume, crops, lr.cams, out=heat)
                explained = True
                timing["explain"] += time.perf_counter() - t
        if lr.outline == "reader" and self._apply_morphology(volume, lr, mal_role):
            # the clinical fusion head was fitted on the image model's scores alone: not on top of these
            if self.bundles.get("fusion") is not None and any(v is not None for v in cleaned.values()):
                lr.notes.append("The lesion was scored from the reader's outline by the morphology model; the clinical "
                                f"fusion model {self.bundles['fusion'].name} was not applied on top of it, so the "
                                "clinical information did not change the malignancy probability.")
            return
        fusion = self.bundles.get("fusion")
        if fusion is not None and lr.probabilities.get("malignancy") is not None:
            fitted_on = fusion.input.get("image_model")
            used = self.bundles[mal_role].name if mal_role in self.bundles else None
            if fitted_on in (None, used):
                lr.probabilities["malignancy_fused"] = fused_probability(fusion, schema, cleaned, lr.probabilities["malignancy"])
                lr.thresholds["malignancy_image"] = lr.thresholds["malignancy"]   # the image model's own
                lr.thresholds["malignancy"] = float(fusion.thresholds.get("probability", lr.thresholds.get("malignancy", 0.5)))
            else:  # a head fitted on another model's scores would misread these
                lr.notes.append(f"The clinical fusion model {fusion.name} was fitted on the scores of {fitted_on}, not "
                                f"of {used}; it was not applied, so the malignancy probability is the image model's "
                                "alone and the clinical information did not change it.")

    def _apply_morphology(self, volume: Volume, lr: LesionResult, mal_role: str) -> bool:
        """Fuse each image score with the reader outline's handcrafted features (2D only); True when the
        malignancy score was fused."""
        from .morphology import FEATURE_NAMES, feature_vector, head_inputs, lesion_features

        fused_malignancy = False
        features = None
        for key, role, img_role in (("malignancy", "morphology-malignancy", mal_role), ("high_risk", "morphology-risk", "risk")):
            b = self.bundles.get(role)
            if b is None or lr.probabilities.get(key) is None:
                continue
            if not volume.is_2d:
                lr.notes.append(f"The morphology model {b.name} describes 2D outlines; this volume's lesions were "
                                "scored by the image models alone.")
                continue
            used = self.bundles[img_role].name if img_role in self.bundles else None
            if b.input.get("image_model") not in (None, used):
                lr.notes.append(f"The morphology model {b.name} was fitted on the scores of {b.input.get('image_model')}, "
                                f"not of {used}; it was not applied.")
                continue
            if list(b.input.get("features", [])[1:]) != list(FEATURE_NAMES):
                raise ModelBundleError(f"The morphology model {b.name} uses other outline features than this version of "
                                       "BreastDLR measures; update BreastDLR or use a matching model.")
            if features is None:
                try:
                    features = feature_vector(lesion_features(volume.array[0], lr.lesion.full_mask(volume.shape)[0]))
                except InputError as exc:   # e.g. a stray speck in the reader's segmentation: that lesion only
                    lr.notes.append(f"Lesion {lr.lesion.id}: {exc} It was scored by the image models alone.")
                    return False
                lr.features = dict(zip(FEATURE_NAMES, features.tolist()))
            x = head_inputs([lr.probabilities[key]], features)
            lr.probabilities[f"{key}_morphology"] = float(b.model().predict_proba(x)[0, 1])
            lr.thresholds[f"{key}_image"] = lr.thresholds[key]
            lr.thresholds[key] = float(b.thresholds.get("probability", 0.5))
            fused_malignancy |= key == "malignancy"
        return fused_malignancy


class _DictInput(torch.nn.Module):
    """Lets a single-view network take the ``{"transverse": x}`` input that Grad-CAM per plane uses."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x["transverse"] if isinstance(x, Mapping) else x)


def fused_probability(bundle: Bundle, schema, cleaned: Mapping[str, Any], p_image: float) -> float:
    """P(malignant) of a clinical fusion head on [logit(image probability), the head's clinical features]."""
    from .clinical import ClinicalSchema

    own = ClinicalSchema(bundle.clinical_variables)
    x_clin, _ = own.encode({k: cleaned.get(k) for k in own.names})
    p = min(max(p_image, 1e-6), 1 - 1e-6)
    x = np.r_[np.log(p / (1 - p)), x_clin][None]
    return float(bundle.model().predict_proba(x)[0, 1])


#: the models analyze and predict use when installed (besides the segmenter and the malignancy model)
OPTIONAL_ROLES = ("risk", "abvs-malignancy", "fusion", "morphology-malignancy", "morphology-risk")


def analyze_volume(volume: Volume, *, model_paths: Optional[Sequence[str]] = None, device: str = "auto",
                   clinical: Optional[Mapping[str, Any]] = None, birads: Optional[str] = None,
                   progress: ProgressCallback = no_progress, cancel: Optional[CancelCheck] = None,
                   outline: Optional[Volume] = None, outline_source: str = "reader") -> Analysis:
    pipe = Pipeline.from_paths(model_paths, device=device, roles=("segmenter", "malignancy"),
                               optional_roles=OPTIONAL_ROLES)
    return pipe.analyze(volume, clinical=clinical, birads=birads, progress=progress, cancel=cancel, outline=outline,
                        outline_source=outline_source)


def analyze_file(input_path: str | Path, out_dir: str | Path, *, clinical: Optional[Mapping[str, Any]] = None,
                 birads: Optional[str] = None, model_paths: Optional[Sequence[str]] = None, device: str = "auto",
                 spacing: Any = None, progress: ProgressCallback = no_progress,
                 cancel: Optional[CancelCheck] = None, outline_path: Optional[str | Path] = None,
                 outline_source: str = "reader") -> Dict[str, Any]:
    """Read a file (and a lesion outline, a mask or label file on its grid, drawn by ``outline_source``),
    analyse it and write every result into ``out_dir``; returns the findings dict."""
    from .io import read_mask, read_volume
    from .outputs import write_analysis

    progress("load", 0.0, f"reading {Path(input_path).name}")
    volume = read_volume(input_path, spacing=spacing)
    outline = volume.with_array(read_mask(outline_path, volume)) if outline_path else None
    result = analyze_volume(volume, model_paths=model_paths, device=device, clinical=clinical, birads=birads,
                            progress=progress, cancel=cancel, outline=outline, outline_source=outline_source)
    check_cancel(cancel)
    progress("write", 0.0, "writing results")
    findings = write_analysis(out_dir, result)
    progress("write", 1.0, "done")
    return findings
