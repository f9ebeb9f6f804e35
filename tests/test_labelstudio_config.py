"""Label configs read into a ProjectVocabulary, and the configs refused with a message."""

from __future__ import annotations

import pytest

from backend.labelstudio.config import LabelConfigError, ProjectVocabulary, parse_label_config
from backend.pipeline.vocabulary import Label

BRUSH = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="tag" toName="image">'
    '<Label value="Couch" predicted_values="sofa, settee"/><Label value="Cat"/>'
    "</BrushLabels></View>"
)


def brush_config(control_attributes: str = "", labels: str = '<Label value="Cat"/>', extra: str = "") -> str:
    return (
        f'<View><Image name="image" value="$image"/>'
        f'<BrushLabels name="tag" toName="image" {control_attributes}>{labels}</BrushLabels>{extra}</View>'
    )


def test_typical_brush_config() -> None:
    assert parse_label_config(BRUSH) == ProjectVocabulary(
        from_name="tag",
        to_name="image",
        image_key="image",
        result_type="brushlabels",
        labels=(Label("Couch", ("sofa", "settee")), Label("Cat")),
        options={},
        keypoint_from_name=None,
        text_prompt_from_name=None,
    )


def test_polygon_only_config() -> None:
    vocabulary = parse_label_config(
        '<View><Image name="img" value="$photo"/>'
        '<PolygonLabels name="poly" toName="img"><Label value="Road"/></PolygonLabels></View>'
    )
    assert (vocabulary.from_name, vocabulary.to_name, vocabulary.image_key) == ("poly", "img", "photo")
    assert vocabulary.result_type == "polygonlabels"
    assert vocabulary.labels == (Label("Road"),)


def test_brush_labels_win_over_an_earlier_polygon_control() -> None:
    vocabulary = parse_label_config(
        '<View><Image name="image" value="$image"/>'
        '<PolygonLabels name="poly" toName="image"><Label value="Road"/></PolygonLabels>'
        '<BrushLabels name="brush" toName="image"><Label value="Sky"/></BrushLabels></View>'
    )
    assert (vocabulary.from_name, vocabulary.result_type) == ("brush", "brushlabels")
    assert vocabulary.labels == (Label("Sky"),)


def test_first_of_two_brush_controls_wins() -> None:
    vocabulary = parse_label_config(
        '<View><Image name="a" value="$first"/><Image name="b" value="$second"/>'
        '<BrushLabels name="one" toName="a"><Label value="Sky"/></BrushLabels>'
        '<BrushLabels name="two" toName="b"><Label value="Sea"/></BrushLabels></View>'
    )
    assert (vocabulary.from_name, vocabulary.to_name, vocabulary.image_key) == ("one", "a", "first")
    assert vocabulary.labels == (Label("Sky"),)


def test_tag_names_match_in_any_case() -> None:
    vocabulary = parse_label_config(
        '<view><image name="image" value="$image"/>'
        '<brushlabels name="tag" toName="image"><label value="Cat"/><LABEL value="Dog"/></brushlabels></view>'
    )
    assert vocabulary.result_type == "brushlabels"
    assert vocabulary.labels == (Label("Cat"), Label("Dog"))


def test_labels_nested_in_views_and_an_xml_declaration() -> None:
    vocabulary = parse_label_config(
        '<?xml version="1.0" encoding="UTF-8"?>'
        + brush_config(labels='<View><Label value="Cat"/></View><Label value="Dog"/>')
    )
    assert [label.name for label in vocabulary.labels] == ["Cat", "Dog"]


def test_synonyms_from_predicted_values_alias_and_hint() -> None:
    vocabulary = parse_label_config(
        brush_config(
            labels='<Label value="Couch" predicted_values="sofa, , couch,settee" alias="Sofa, lounge" hint="divan"/>'
        )
    )
    assert vocabulary.labels == (Label("Couch", ("sofa", "settee", "lounge", "divan")),)


def test_config_without_brush_or_polygon_labels_names_the_tag() -> None:
    with pytest.raises(LabelConfigError, match="BrushLabels") as caught:
        parse_label_config(
            '<View><Image name="image" value="$image"/>'
            '<RectangleLabels name="box" toName="image"><Label value="Cat"/></RectangleLabels></View>'
        )
    assert "PolygonLabels" in str(caught.value)
    assert "<Label value=" in str(caught.value)


def test_control_without_to_name_is_refused() -> None:
    with pytest.raises(LabelConfigError, match="<BrushLabels> needs both a name and a toName attribute"):
        parse_label_config(
            '<View><Image name="image" value="$image"/>'
            '<BrushLabels name="tag"><Label value="Cat"/></BrushLabels></View>'
        )


def test_repeated_labels_are_refused_whatever_their_case() -> None:
    with pytest.raises(LabelConfigError, match='repeats the label "cat"'):
        parse_label_config(brush_config(labels='<Label value="Cat"/><Label value="Dog"/><Label value="cat"/>'))
    with pytest.raises(LabelConfigError, match='repeats the label "Cat"'):
        parse_label_config(brush_config(labels='<Label value="Cat"/><Label value="Cat"/>'))


def test_control_without_labels_is_refused() -> None:
    with pytest.raises(LabelConfigError, match='<BrushLabels name="tag"> has no labels'):
        parse_label_config(brush_config(labels=""))


def test_label_without_value_is_refused() -> None:
    with pytest.raises(LabelConfigError, match="has no value"):
        parse_label_config(brush_config(labels='<Label value="Cat"/><Label background="red"/>'))


@pytest.mark.parametrize("xml", ["", "<View>", "<View><Image name='image' value='$image'></View>", "not xml"])
def test_invalid_xml(xml: str) -> None:
    with pytest.raises(LabelConfigError, match="^label config is not valid XML: "):
        parse_label_config(xml)


@pytest.mark.parametrize(
    "xml",
    [
        '<!DOCTYPE View [<!ENTITY cat "Cat">]>' + brush_config(labels='<Label value="&cat;"/>'),
        '<!doctype View SYSTEM "file:///etc/passwd">' + BRUSH,
        '<View><!ENTITY x "y"></View>',
    ],
)
def test_doctype_and_entity_declarations_are_refused(xml: str) -> None:
    with pytest.raises(LabelConfigError, match="DOCTYPE"):
        parse_label_config(xml)


def test_control_pointing_at_a_non_image_is_refused() -> None:
    message = r'<BrushLabels name="tag"> points at <Text name="text">, not an <Image>'
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(
            '<View><Text name="text" value="$text"/>'
            '<BrushLabels name="tag" toName="text"><Label value="Cat"/></BrushLabels></View>'
        )


def test_control_pointing_at_a_missing_tag_is_refused() -> None:
    with pytest.raises(LabelConfigError, match='toName="picture", but no tag is named "picture"'):
        parse_label_config(
            '<View><Image name="image" value="$image"/>'
            '<BrushLabels name="tag" toName="picture"><Label value="Cat"/></BrushLabels></View>'
        )


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ('<Image name="image"/>', r'<Image name="image"> has no value'),
        ('<Image name="image" value="image.png"/>', r'must take one image .* found \'image.png\''),
        ('<Image name="image" valueList="$images"/>', r"must take one image .* found '\$images'"),
    ],
)
def test_image_without_a_data_key_is_refused(image: str, message: str) -> None:
    control = '<BrushLabels name="tag" toName="image"><Label value="Cat"/></BrushLabels>'
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(f"<View>{image}{control}</View>")


def test_options_from_control_attributes() -> None:
    vocabulary = parse_label_config(
        brush_config(
            'model_k=" 5" model_refine="CRF" model_use_caption="false" model_caption_fallback="True" '
            'model_score_threshold="0.5"'
        )
    )
    assert vocabulary.options == {"k": 5, "refine": "crf", "use_caption": False, "caption_fallback": True}


@pytest.mark.parametrize("k", [2, 32])
def test_k_bounds_are_accepted(k: int) -> None:
    assert parse_label_config(brush_config(f'model_k="{k}"')).options == {"k": k}


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("model_k", "1"),
        ("model_k", "33"),
        ("model_k", "five"),
        ("model_k", "5.0"),
        ("model_k", "-3"),
        ("model_k", ""),
        ("model_refine", "dense"),
        ("model_use_caption", "yes"),
        ("model_caption_fallback", "1"),
    ],
)
def test_invalid_options_name_the_attribute(attribute: str, value: str) -> None:
    with pytest.raises(LabelConfigError, match=f'^{attribute}="{value}" must be'):
        parse_label_config(brush_config(f'{attribute}="{value}"'))


def test_keypoint_and_prompt_controls_on_the_same_image() -> None:
    vocabulary = parse_label_config(
        brush_config(
            extra='<Image name="other" value="$other"/>'
            '<KeyPointLabels name="elsewhere" toName="other"><Label value="Cat"/></KeyPointLabels>'
            '<KeyPointLabels name="clicks" toName="image" smart="true"><Label value="Cat"/></KeyPointLabels>'
            '<KeyPointLabels name="more_clicks" toName="image"><Label value="Cat"/></KeyPointLabels>'
            '<TextArea name="comment" toName="image"/>'
            '<TextArea name="prompt_b" toName="image"/>'
            '<textarea name="prompt" toName="image"/>'
        )
    )
    assert vocabulary.keypoint_from_name == "clicks"
    assert vocabulary.text_prompt_from_name == "prompt"


def test_prompt_and_clicks_on_another_image_are_ignored() -> None:
    vocabulary = parse_label_config(
        brush_config(
            extra='<Image name="other" value="$other"/><TextArea name="prompt" toName="other"/>'
            '<KeyPointLabels name="clicks" toName="other"><Label value="Cat"/></KeyPointLabels>'
            '<TextArea name="notes" toName="image"/>'
        )
    )
    assert vocabulary.text_prompt_from_name is None
    assert vocabulary.keypoint_from_name is None


def test_label_config_error_is_a_value_error() -> None:
    assert issubclass(LabelConfigError, ValueError)
