"""The clinical-information form, generated from a model's declared clinical variables.

Numbers: a QDoubleSpinBox with the unit as suffix and the valid range; its lowest position (one step below
the valid minimum) reads "unknown".  Categories and yes/no: a QComboBox whose first item is "unknown".
:func:`form_spec` and :func:`value_from_widget_state` are plain Python; :class:`ClinicalForm` needs Qt.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

try:
    from slicer.i18n import tr as _
except ImportError:
    def _(text: str) -> str:
        return text

NUMBER_LIMIT = 1.0e6  # open ranges in a spin box


def form_spec(variables: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One dict per variable (name, label, type, unit, min, max, choices, required, tooltip), using the
    engine's :class:`BreastDLRLib.clinical.ClinicalSchema` when it accepts the declaration."""
    try:
        from BreastDLRLib.clinical import ClinicalSchema

        spec = ClinicalSchema.from_manifest(list(variables)).to_form_spec()
    except Exception:  # a declaration the engine refuses is reported when the analysis runs
        spec = [{"name": v["name"], "label": str(v["name"]), "type": v.get("type", "number"), "unit": v.get("unit", ""),
                 "min": v.get("min"), "max": v.get("max"), "categories": v.get("categories"),
                 "required": v.get("missing", "refuse") == "refuse", "help": v.get("description", "")}
                for v in variables]
    out = []
    for s in spec:
        kind = s["type"]
        choices = None
        if kind == "bool":
            choices = ["yes", "no"]
        elif kind == "category":
            choices = [str(c) for c in (s.get("categories") or [])]
        out.append({
            "name": s["name"], "label": s.get("label") or s["name"], "type": kind, "unit": s.get("unit") or "",
            "min": s.get("min"), "max": s.get("max"), "choices": choices, "required": bool(s.get("required")),
            "tooltip": s.get("help") or s.get("description") or "",
        })
    return out


def spin_limits(entry: Mapping[str, Any], step: float) -> tuple:
    """(spin minimum, spin maximum): the minimum is one step below the valid minimum and means "unknown"."""
    lo = entry.get("min")
    hi = entry.get("max")
    lo = -NUMBER_LIMIT if lo is None else float(lo)
    hi = NUMBER_LIMIT if hi is None else float(hi)
    return lo - step, hi


def value_from_widget_state(entry: Mapping[str, Any], number: Optional[float] = None, index: Optional[int] = None,
                            step: float = 1.0) -> Any:
    """The clinical value a widget shows: None for "unknown", a float, True/False, or a category string."""
    if entry["type"] == "number":
        lo, _hi = spin_limits(entry, step)
        return None if number is None or number <= lo + 1e-9 else float(number)
    if index is None or index <= 0:
        return None
    choice = entry["choices"][index - 1]
    if entry["type"] == "bool":
        return choice == "yes"
    return choice


def step_for(entry: Mapping[str, Any]) -> float:
    lo, hi = entry.get("min"), entry.get("max")
    if lo is not None and hi is not None and float(hi) - float(lo) <= 10:
        return 0.1
    return 1.0


class ClinicalForm:
    """Fills a QFormLayout with one widget per variable and reads the values back."""

    def __init__(self, layout) -> None:
        self.layout = layout
        self.entries: List[Dict[str, Any]] = []
        self.widgets: List[Any] = []

    def clear(self) -> None:
        while self.layout.count():
            item = self.layout.takeAt(0)
            widget = item.widget()
            if widget is not None:
                widget.deleteLater()
        self.entries, self.widgets = [], []

    def build(self, variables: Sequence[Mapping[str, Any]]) -> None:
        import qt

        self.clear()
        for entry in form_spec(variables):
            if entry["type"] == "number":
                widget = qt.QDoubleSpinBox()
                step = step_for(entry)
                lo, hi = spin_limits(entry, step)
                widget.setDecimals(1 if step >= 1 else 2)
                widget.setSingleStep(step)
                widget.setRange(lo, hi)
                widget.setSpecialValueText(_("unknown"))
                if entry["unit"]:
                    widget.setSuffix(" " + entry["unit"])
                widget.setValue(lo)
            else:
                widget = qt.QComboBox()
                widget.addItem(_("unknown"))
                for choice in entry["choices"] or []:
                    widget.addItem(_(choice) if entry["type"] == "bool" else choice)
            widget.setToolTip(entry["tooltip"])
            label = entry["label"] + (" *" if entry["required"] else "")
            self.layout.addRow(label, widget)
            self.entries.append(entry)
            self.widgets.append(widget)

    def values(self) -> Dict[str, Any]:
        """{variable name: value or None (unknown)} for every variable of the form."""
        out: Dict[str, Any] = {}
        for entry, widget in zip(self.entries, self.widgets):
            if entry["type"] == "number":
                out[entry["name"]] = value_from_widget_state(entry, number=widget.value, step=widget.singleStep)
            else:
                out[entry["name"]] = value_from_widget_state(entry, index=widget.currentIndex)
        return out

    def missing_required(self) -> List[str]:
        vals = self.values()
        return [e["label"] for e in self.entries if e["required"] and vals.get(e["name"]) is None]
