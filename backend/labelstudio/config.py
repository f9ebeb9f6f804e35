"""A project's label config, read into what the pipeline needs to serve it.

Label Studio sends the config XML with /setup and /predict. Everything this
backend cannot serve is refused here, at /setup time, with a message naming
the tag or attribute to fix, rather than as empty or unrenderable predictions
later. The SDK's label interface finds the control and object tags; the
labels are read with ``xml.etree`` because the SDK keys them by value (so
repeated values vanish) and matches ``<Label>`` case-sensitively, while Label
Studio matches tag names in any case.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from label_studio_sdk._legacy.exceptions import LabelStudioXMLSyntaxErrorSentryIgnored
from label_studio_sdk.label_interface import LabelInterface
from label_studio_sdk.label_interface.control_tags import ControlTag
from label_studio_sdk.label_interface.object_tags import ObjectTag

from backend.inputs import MAX_LABELS
from backend.options import OptionError, OptionValue, option_changes
from backend.pipeline.vocabulary import Label

_RESULT_TYPES = ("brushlabels", "polygonlabels")  # in order of preference
_PROMPT_NAME = "prompt"
_SYNONYM_ATTRIBUTES = ("predicted_values", "alias", "hint")
_OPTION_PREFIX = "model_"
# lxml refuses a str that declares its encoding; the declaration says nothing a str needs.
_XML_DECLARATION = re.compile(r"^\s*<\?xml[^>]*\?>")
_DECLARATIONS = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


class LabelConfigError(ValueError):
    """A config this backend cannot serve; the message names the tag it needs."""


@dataclass(frozen=True)
class ProjectVocabulary:
    """What a project's label config asks of the pipeline and its results."""

    from_name: str
    to_name: str
    image_key: str
    result_type: str
    labels: tuple[Label, ...]
    options: dict[str, OptionValue] = field(default_factory=dict)  # typed changes to SegmentOptions
    keypoint_from_name: str | None = None
    text_prompt_from_name: str | None = None


def parse_label_config(xml: str, max_labels: int = MAX_LABELS) -> ProjectVocabulary:
    """Read the first BrushLabels control (else the first PolygonLabels) and its Image.

    ``options`` holds the control's ``model_k``, ``model_refine``,
    ``model_use_caption`` and ``model_caption_fallback`` attributes, validated and
    keyed without the prefix and typed (``{"k": 5, "use_caption": False}``, see
    ``backend.options``). Other ``model_*`` attributes are left alone, as
    configs shared with other backends carry theirs.

    ``keypoint_from_name`` is the first KeyPointLabels control on the same Image,
    whose clicks steer interactive predictions. ``text_prompt_from_name`` is the
    first ``<TextArea>`` on the same Image whose name is exactly ``prompt``: the
    naming rule lets annotators type words that steer the labels, while TextAreas
    with other names (comments, transcriptions) are never read as prompts.

    Raises LabelConfigError for invalid XML, DOCTYPE or ENTITY declarations, a
    config without a BrushLabels or PolygonLabels control, a control not pointing
    at an ``<Image value="$key">``, a control without labels or with more than
    ``max_labels``, repeated label values and invalid options.
    """
    root = _parse_xml(xml)
    interface = _label_interface(xml)
    control = _main_control(interface.controls, root)
    image = _image_of(control, interface.objects, root)
    return ProjectVocabulary(
        from_name=control.name,
        to_name=image.name,
        image_key=image.value_name,
        result_type=control.tag.lower(),
        labels=_labels(control, root, max_labels),
        options=_options(control),
        keypoint_from_name=_first_name(
            interface.controls, lambda c: _is(c, "keypointlabels") and _points_at(c, image.name)
        ),
        text_prompt_from_name=_first_name(
            interface.controls,
            lambda c: _is(c, "textarea") and c.name == _PROMPT_NAME and _points_at(c, image.name),
        ),
    )


def _parse_xml(xml: str) -> ET.Element:
    """Parse with the standard library, refusing declarations that expand entities."""
    if _DECLARATIONS.search(xml):
        raise LabelConfigError("label config must not contain <!DOCTYPE> or <!ENTITY> declarations")
    try:
        return ET.fromstring(xml)
    except (ET.ParseError, UnicodeError) as exc:  # UnicodeError: a lone surrogate, which JSON can carry
        raise LabelConfigError(f"label config is not valid XML: {exc}") from exc


def _label_interface(xml: str) -> LabelInterface:
    try:
        return LabelInterface(_XML_DECLARATION.sub("", xml, count=1))
    except LabelStudioXMLSyntaxErrorSentryIgnored as exc:  # what the standard library accepts, lxml may not
        raise LabelConfigError(f"label config is not valid XML: {exc}") from None


def _is(tag: ControlTag | ObjectTag, name: str) -> bool:
    return tag.tag.lower() == name


def _points_at(control: ControlTag, name: str) -> bool:
    return name in (to_name.strip() for to_name in control.to_name)


def _first_name(controls: Iterable[ControlTag], wanted: Callable[[ControlTag], bool]) -> str | None:
    return next((control.name for control in controls if wanted(control)), None)


def _main_control(controls: list[ControlTag], root: ET.Element) -> ControlTag:
    for result_type in _RESULT_TYPES:
        for control in controls:
            if _is(control, result_type):
                return control
    # The SDK sees a control only when it has both name and toName.
    for element in root.iter():
        if element.tag.lower() in _RESULT_TYPES:
            raise LabelConfigError(f'<{element.tag}> needs both a name and a toName attribute')
    raise LabelConfigError(
        "the label config has no BrushLabels (or PolygonLabels) control; "
        'add <BrushLabels name="..." toName="..."> with <Label value="..."/> children'
    )


def _image_of(control: ControlTag, objects: list[ObjectTag], root: ET.Element) -> ObjectTag:
    """The ``<Image value="$key">`` the control points to, or a message saying what is wrong."""
    where = f'<{control.tag} name="{control.name}">'
    to_name = control.to_name[0].strip()
    image = next((obj for obj in objects if obj.name == to_name), None)
    if image is None:
        element = next((el for el in root.iter() if el.get("name") == to_name), None)
        if element is None:
            raise LabelConfigError(f'{where} has toName="{to_name}", but no tag is named "{to_name}"')
        if element.tag.lower() != "image":
            raise LabelConfigError(f'{where} points at <{element.tag} name="{to_name}">, not an <Image>')
        raise LabelConfigError(f'<Image name="{to_name}"> has no value; give it value="$image"')
    if not _is(image, "image"):
        raise LabelConfigError(f'{where} points at <{image.tag} name="{to_name}">, not an <Image>')
    if image.is_image_list or not image.value_is_variable:
        raise LabelConfigError(
            f'<Image name="{to_name}"> must take one image from the task data, '
            f'as in value="$image"; found {image.attr.get("valueList") or image.value!r}'
        )
    return image


def _labels(control: ControlTag, root: ET.Element, max_labels: int) -> tuple[Label, ...]:
    """Every ``<Label>`` under the control, in order, refusing repeated values and more than ``max_labels``."""
    where = f'<{control.tag} name="{control.name}">'
    element = next(
        el for el in root.iter() if el.tag.lower() == control.tag.lower() and el.get("name") == control.name
    )
    labels: list[Label] = []
    seen: set[str] = set()
    for child in element.iter():
        if child.tag.lower() != "label":
            continue
        value = child.get("value") or ""  # kept as written: results must carry it exactly
        if not value.strip():
            raise LabelConfigError(f'a <Label> in {where} has no value; give it value="..."')
        if len(labels) == max_labels:
            raise LabelConfigError(f"{where} has more than {max_labels} labels; remove some, or raise "
                                   "FREESEG_MAX_LABELS (every label costs time on every task)")
        if value.lower() in seen:
            raise LabelConfigError(f'{where} repeats the label "{value}"; label values must be unique')
        seen.add(value.lower())
        labels.append(Label(value, _synonyms(child, value)))
    if not labels:
        raise LabelConfigError(f'{where} has no labels; add <Label value="..."/> children')
    return tuple(labels)


def _synonyms(label: ET.Element, value: str) -> tuple[str, ...]:
    """Comma-separated words of ``predicted_values``, ``alias`` and ``hint``, without the value."""
    words = {value.lower(): value}
    for attribute in _SYNONYM_ATTRIBUTES:
        for word in (label.get(attribute) or "").split(","):
            if word.strip():
                words.setdefault(word.strip().lower(), word.strip())
    return tuple(words.values())[1:]


def _options(control: ControlTag) -> dict[str, OptionValue]:
    attributes = {key.lower().removeprefix(_OPTION_PREFIX): value for key, value in control.attr.items()
                  if key.lower().startswith(_OPTION_PREFIX)}
    try:
        return option_changes(attributes, where=lambda name: f"{_OPTION_PREFIX}{name}")
    except OptionError as error:
        raise LabelConfigError(str(error)) from None
