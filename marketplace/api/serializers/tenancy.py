"""Serializers of tenancy: API keys, and who a key or session acts as."""

from rest_framework import serializers

from marketplace.choices import Role
from marketplace.models import ApiKey, SshKey


class ApiKeySerializer(serializers.ModelSerializer):
    created_by = serializers.EmailField(source="created_by.email", read_only=True)
    status = serializers.ChoiceField(choices=["active", "expired", "revoked"], read_only=True)

    class Meta:
        model = ApiKey
        fields = [
            "id",
            "name",
            "role",
            "prefix",
            "status",
            "created_by",
            "created_at",
            "expires_at",
            "revoked_at",
            "last_used_at",
        ]
        read_only_fields = fields


class ApiKeyCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    role = serializers.ChoiceField(
        choices=Role.choices,
        required=False,
        help_text="At most your own role. Defaults to member (viewer for viewers).",
    )
    expires_at = serializers.DateTimeField(required=False, allow_null=True)


class ApiKeyCreatedSerializer(ApiKeySerializer):
    key = serializers.CharField(read_only=True, help_text="The full key. Shown only in this response; store it now.")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]
        read_only_fields = fields


class MeSerializer(serializers.Serializer):
    email = serializers.EmailField()
    organization = serializers.DictField()
    role = serializers.ChoiceField(choices=Role.choices)
    api_key_prefix = serializers.CharField(allow_null=True)


class SshKeySerializer(serializers.ModelSerializer):
    owner = serializers.EmailField(source="owner.email", read_only=True, allow_null=True, default=None)
    shared = serializers.SerializerMethodField(help_text="Shared by the whole organization (no owner).")

    class Meta:
        model = SshKey
        fields = ["id", "name", "key_type", "bits", "fingerprint", "public_key", "owner", "shared", "created_at"]
        read_only_fields = fields

    def get_shared(self, key: SshKey) -> bool:
        return key.owner_id is None


class SshKeyCreateSerializer(serializers.Serializer):
    public_key = serializers.CharField(
        max_length=20_000, trim_whitespace=True, help_text="One line of a .pub file: <type> <base64> [comment]."
    )
    name = serializers.CharField(max_length=100, required=False, allow_blank=True, help_text="Default: its comment.")
    shared = serializers.BooleanField(default=False, help_text="For the whole organization (admins and owners).")
