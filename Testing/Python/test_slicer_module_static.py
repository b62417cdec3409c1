"""Static checks of the Slicer module (BreastDLR/).

Desktop Slicer (Qt, PythonQt, ``slicer.app``) cannot run in this test environment, so the module's GUI code
is not executed here (``BreastDLRTest`` inside the module runs the whole workflow in Slicer).  These tests
check real properties of the files instead: the Python parses and has the scripted-module structure, every
user-visible string literal given to a Qt setter goes through ``_()``, the .ui is valid Qt Designer XML with
the widgets and parameter bindings the code uses, and CMakeLists.txt ships every file.
"""
from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "BreastDLR"
MODULE_FILE = MODULE_DIR / "BreastDLR.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "BreastDLR.ui"
CMAKE_FILE = MODULE_DIR / "CMakeLists.txt"

#: Calls whose first argument is shown to the user.
USER_TEXT_CALLS = {
    "setText", "setToolTip", "setWindowTitle", "setPlaceholderText", "setStatusTip", "setWhatsThis",
    "setSpecialValueText", "setTitle", "addItem", "addItems", "showStatusMessage", "errorDisplay", "infoDisplay",
    "warningDisplay", "confirmOkCancelDisplay", "confirmYesNoDisplay", "tryWithErrorDisplay",
}
#: Attributes whose assigned value is shown to the user.
USER_TEXT_ATTRS = {"title", "helpText", "acknowledgementText", "toolTip", "text", "windowTitle"}


def python_files() -> List[Path]:
    return sorted(MODULE_DIR.rglob("*.py"))


def is_user_literal(node: ast.AST) -> bool:
    """A string literal (or f-string) with letters in it, not wrapped in _()."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return bool(re.search(r"[A-Za-z]", node.value))
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.Constant) and re.search(r"[A-Za-z]", str(v.value)) for v in node.values)
    if isinstance(node, ast.BinOp):  # "text" + x
        return is_user_literal(node.left) or is_user_literal(node.right)
    return False


def untranslated_literals(source: str) -> List[Tuple[int, str]]:
    """(line, snippet) of user-visible string literals not passed through _()."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in USER_TEXT_CALLS:
                args = list(node.args[:1]) + [k.value for k in node.keywords if k.arg in ("text", "windowTitle", "title")]
                bad += [(node.lineno, ast.unparse(a)) for a in args if is_user_literal(a)]
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and target.attr in USER_TEXT_ATTRS and is_user_literal(node.value):
                    bad.append((node.lineno, ast.unparse(node.value)))
    return bad


def ui_tree() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def ui_widgets() -> Dict[str, ET.Element]:
    return {w.get("name"): w for w in ui_tree().iter("widget")}


# ----------------------------------------------------------------------------------------------- python
@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(MODULE_DIR)))
def test_module_python_parses_and_translates_user_strings(path):
    source = path.read_text(encoding="utf-8")
    ast.parse(source, filename=str(path))
    assert untranslated_literals(source) == []


def test_translation_check_catches_a_bare_literal():
    snippet = 'w.setText("Start")\nw.setToolTip(_("ok"))\nself.parent.title = "BreastDLR"\nw.setText(f"{n} lesions")\n'
    assert sorted(line for line, _ in untranslated_literals(snippet)) == [1, 3, 4]


def test_only_the_module_file_sits_in_the_module_folder():
    """Slicer loads every .py next to a scripted module as a module of its own."""
    assert [p.name for p in MODULE_DIR.glob("*.py")] == ["BreastDLR.py"]


def test_scripted_module_structure():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    classes = {c.name: c for c in tree.body if isinstance(c, ast.ClassDef)}
    bases = {name: [ast.unparse(b) for b in c.bases] for name, c in classes.items()}
    assert bases["BreastDLR"] == ["ScriptedLoadableModule"]
    assert bases["BreastDLRWidget"][0] == "ScriptedLoadableModuleWidget"
    assert bases["BreastDLRLogic"] == ["ScriptedLoadableModuleLogic"]
    assert bases["BreastDLRTest"] == ["ScriptedLoadableModuleTest"]
    assert [ast.unparse(d) for d in classes["BreastDLRParameterNode"].decorator_list] == ["parameterNodeWrapper"]
    setup = next(f for f in classes["BreastDLRWidget"].body if isinstance(f, ast.FunctionDef) and f.name == "setup")
    calls = {ast.unparse(n.func) for n in ast.walk(setup) if isinstance(n, ast.Call)}
    assert {"slicer.util.loadUI", "slicer.util.childWidgetVariables"} <= calls
    # process() has the documented signature
    process = next(f for f in classes["BreastDLRLogic"].body if isinstance(f, ast.FunctionDef) and f.name == "process")
    names = [a.arg for a in process.args.args]
    assert names[:8] == ["self", "volumeNode", "clinical", "birads", "modelPaths", "device", "wait", "progressCallback"]
    # GUI actions are wrapped in tryWithErrorDisplay
    widget_src = ast.unparse(classes["BreastDLRWidget"])
    for handler in ("onApplyButton", "onImportModel", "refreshModels"):
        body = next(ast.unparse(f) for f in classes["BreastDLRWidget"].body if isinstance(f, ast.FunctionDef) and f.name == handler)
        assert "slicer.util.tryWithErrorDisplay" in body, handler
    assert "with slicer.util.tryWithErrorDisplay" in widget_src


def test_no_dependency_installation_at_import_time():
    """pip/PyTorch installs only inside functions, never at module level or in the module constructor."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    module_level = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    ctor = next(f for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "BreastDLR"
                for f in c.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    text = "\n".join(ast.unparse(n) for n in module_level + [ctor])
    for word in ("pip_install", "installTorch", "ensure_dependencies", "packaging"):
        assert word not in text


# ----------------------------------------------------------------------------------------------- ui
def test_ui_is_valid_and_has_every_widget_the_code_uses():
    widgets = ui_widgets()
    assert ui_tree().tag == "ui" and widgets["BreastDLR"].get("class") == "qMRMLWidget"
    source = MODULE_FILE.read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.([A-Za-z_]\w*)", source))
    assert used, "the widget code uses no ui widget?"
    assert used - set(widgets) == set()
    expected = {"inputSelector": "qMRMLNodeComboBox", "modelSelector": "QComboBox", "importModelButton": "QPushButton",
                "biradsSelector": "QComboBox", "deviceSelector": "QComboBox", "applyButton": "QPushButton",
                "progressBar": "QProgressBar", "statusLabel": "QLabel", "heatmapOpacitySlider": "ctkSliderWidget",
                "resultsTableView": "qMRMLTableView"}
    assert {n: widgets[n].get("class") for n in expected} == expected


def test_ui_sections():
    texts = {}
    for w in ui_tree().iter("widget"):
        if w.get("class") == "ctkCollapsibleButton":
            prop = w.find("./property[@name='text']/string")
            texts[w.get("name")] = prop.text
    assert sorted(texts.values()) == sorted(["Inputs", "Clinical information", "Advanced", "Results"])


def parameter_fields() -> Dict[str, str]:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    cls = next(c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "BreastDLRParameterNode")
    return {s.target.id: ast.unparse(s.annotation) for s in cls.body if isinstance(s, ast.AnnAssign)}


def test_ui_parameter_bindings_match_the_parameter_node():
    fields = parameter_fields()
    bound = {}
    for w in ui_tree().iter("widget"):
        prop = w.find("./property[@name='SlicerParameterName']/string")
        if prop is not None:
            bound[prop.text] = w.get("class")
    assert set(bound) <= set(fields), set(bound) - set(fields)
    compatible = {"qMRMLNodeComboBox": r"^vtkMRML\w+Node$", "QComboBox": r"Choice\(", "ctkSliderWidget": r"float.*WithinRange",
                  "QDoubleSpinBox": r"^Annotated\[float|^float$"}
    for name, cls in bound.items():
        assert re.search(compatible[cls], fields[name]), (name, cls, fields[name])
    assert {"inputVolume", "birads", "device", "heatmapOpacity"} <= set(bound)


def test_combo_choices_are_the_documented_ones():
    source = MODULE_FILE.read_text(encoding="utf-8")
    tree = ast.parse(source)
    values = {t.targets[0].id: ast.literal_eval(t.value) for t in tree.body
              if isinstance(t, ast.Assign) and isinstance(t.targets[0], ast.Name) and t.targets[0].id.endswith("_CHOICES")}
    assert values["BIRADS_CHOICES"] == ["unknown", "2", "3", "4a", "4b", "4c", "5"]
    assert values["DEVICE_CHOICES"] == ["auto", "cpu", "cuda"]


# ----------------------------------------------------------------------------------------------- cmake and files
def cmake_list(variable: str) -> List[str]:
    text = CMAKE_FILE.read_text(encoding="utf-8")
    m = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", text, re.S)
    assert m, variable
    return [t.replace("${MODULE_NAME}", "BreastDLR") for t in m.group(1).split() if not t.startswith("#")]


def test_cmake_lists_every_module_file_and_nothing_missing():
    scripts = cmake_list("MODULE_PYTHON_SCRIPTS")
    resources = cmake_list("MODULE_PYTHON_RESOURCES")
    on_disk_py = sorted(str(p.relative_to(MODULE_DIR)) for p in python_files())
    on_disk_res = sorted(str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file())
    assert sorted(scripts) == on_disk_py
    assert sorted(resources) == on_disk_res
    text = CMAKE_FILE.read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule" in text
    assert "BreastDLRLib/*.py" in text and "Resources/Samples/*" in text and "Resources/Models/*" in text


def test_icons_are_128_pixels_and_identical():
    from PIL import Image

    a = MODULE_DIR / "Resources" / "Icons" / "BreastDLR.png"
    b = REPO / "BreastDLR.png"
    with Image.open(a) as img:
        assert img.size == (128, 128) and img.format == "PNG"
    assert a.read_bytes() == b.read_bytes()
