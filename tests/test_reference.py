"""docs/configuration.md is written from the fields' declarations (reference.py walks every
field, so it lists every key and only keys that exist): it must be what they print."""

import pathlib

from stackwise_ray.reference import reference

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_configuration_reference_is_what_the_declarations_print():
    assert (ROOT / "docs" / "configuration.md").read_text() == reference(), (
        "docs/configuration.md is stale: python -m stackwise_ray.reference > docs/configuration.md")

