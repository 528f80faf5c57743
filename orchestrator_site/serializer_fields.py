"""String fields that take only JSON strings, and bodies that take only their own fields.

DRF's ``CharField`` (and its slug and URL kinds) turn a JSON number or boolean into a string, so
``{"name": 5}`` would pass where the schema says string. Every API serializer uses these instead.
DRF also drops a key that is no field, so a typo (``"rpm_limt"``) would pass silently:
:class:`RefuseUnknownFields` makes it a 400 (and the schema says so, ``orchestrator_site.schema``).
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import models
from rest_framework import serializers


class _StringsOnly:
    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            raise serializers.ValidationError("Not a valid string.", code="invalid")
        return super().to_internal_value(data)  # type: ignore[misc]


class StrictCharField(_StringsOnly, serializers.CharField):
    """A CharField that takes only JSON strings."""


class StrictSlugField(_StringsOnly, serializers.SlugField):
    """A SlugField that takes only JSON strings."""


class StrictURLField(_StringsOnly, serializers.URLField):
    """A URLField that takes only JSON strings."""


# For ``ModelSerializer.serializer_field_mapping``: model string fields become strict ones.
STRICT_STRING_MAPPING: dict[type[models.Field], type[serializers.Field]] = {
    models.CharField: StrictCharField,
    models.TextField: StrictCharField,
    models.SlugField: StrictSlugField,
    models.URLField: StrictURLField,
}


class RefuseUnknownFields:
    """For a serializer of a JSON object: a key that is none of its fields is a 400 naming it.

    Read-only fields are fields: sent, they are ignored as DRF does, so the body of a GET can be PUT back.
    """

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))  # type: ignore[attr-defined]
            if unknown:
                raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return super().to_internal_value(data)  # type: ignore[misc]


class ModelCleanMixin:
    """For a ``ModelSerializer``: run the model's ``clean()`` so the API and the admin enforce the same
    rules; string fields take only JSON strings."""

    serializer_field_mapping = {**serializers.ModelSerializer.serializer_field_mapping, **STRICT_STRING_MAPPING}

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        instance = self.instance or self.Meta.model()  # type: ignore[attr-defined]
        for name, value in attrs.items():
            setattr(instance, name, value)
        try:
            instance.clean()
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.message_dict) from None
        return attrs
