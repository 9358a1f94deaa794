"""REST endpoints of tenancy: API keys, SSH keys, and who a key or session acts as. Thin: parse, call one service or
selector, render."""

from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response
from rest_framework.views import APIView

from console.kernel.api import error_responses
from marketplace.api.boundary import TenantRowsMixin, TenantScopedMixin
from marketplace.api.serializers.tenancy import (
    ApiKeyCreatedSerializer,
    ApiKeyCreateSerializer,
    ApiKeySerializer,
    MeSerializer,
    SshKeyCreateSerializer,
    SshKeySerializer,
)
from marketplace.models import ApiKey, SshKey
from marketplace.selectors.tenancy import api_key_get, api_key_list, ssh_key_get, ssh_key_list
from marketplace.services.tenancy.api_keys import api_key_create, api_key_revoke
from marketplace.services.tenancy.ssh_keys import ssh_key_add, ssh_key_remove


@extend_schema_view(
    list=extend_schema(
        summary="Your organization's API keys",
        description="Admins and owners see every key; others see the keys they created.",
        responses={200: ApiKeySerializer(many=True), **error_responses(403)},
    ),
    retrieve=extend_schema(summary="An API key", responses={200: ApiKeySerializer, **error_responses(403, 404)}),
)
class ApiKeyViewSet(TenantRowsMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = ApiKeySerializer
    queryset = ApiKey.objects.none()  # the schema's model; requests read through api_key_list

    def rows(self, tenant):
        return api_key_list(tenant=tenant)

    def row(self, tenant, pk):
        return api_key_get(tenant=tenant, key_id=pk)

    @extend_schema(
        summary="Create an API key",
        request=ApiKeyCreateSerializer,
        description="The response holds the full key, once. Only a digest is stored.",
        responses={201: ApiKeyCreatedSerializer, **error_responses(400, 403)},
    )
    def create(self, request):
        params = ApiKeyCreateSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        key, plaintext = api_key_create(tenant=self.tenant, **params.validated_data)
        key.key = plaintext
        return Response(ApiKeyCreatedSerializer(key).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Revoke an API key", request=None, responses={200: ApiKeySerializer, **error_responses(403, 404)}
    )
    @action(detail=True, methods=["post"])
    def revoke(self, request, pk=None):
        key = api_key_revoke(tenant=self.tenant, key=self.get_object())
        return Response(ApiKeySerializer(key).data)


class MeView(TenantScopedMixin, APIView):
    @extend_schema(summary="Who this key or session acts as", responses={200: MeSerializer, **error_responses(403)})
    def get(self, request):
        tenant = self.tenant
        org = tenant.organization
        return Response(
            MeSerializer(
                {
                    "email": tenant.user.email,
                    "organization": {"id": str(org.id), "slug": org.slug, "name": org.name},
                    "role": tenant.role,
                    "api_key_prefix": tenant.api_key.prefix if tenant.api_key else None,
                }
            ).data
        )


@extend_schema_view(
    list=extend_schema(
        summary="SSH keys: yours and the organization's shared ones",
        description="Admins and owners see every member's keys too.",
        responses={200: SshKeySerializer(many=True), **error_responses(403)},
    ),
    retrieve=extend_schema(summary="An SSH key", responses={200: SshKeySerializer, **error_responses(403, 404)}),
)
class SshKeyViewSet(TenantRowsMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = SshKeySerializer
    queryset = SshKey.objects.none()  # the schema's model; requests read through ssh_key_list

    def rows(self, tenant):
        return ssh_key_list(tenant=tenant)

    def row(self, tenant, pk):
        return ssh_key_get(tenant=tenant, key_id=pk)

    @extend_schema(
        summary="Add an SSH public key",
        description="ssh-ed25519, ecdsa-sha2-nistp256/384/521, or ssh-rsa of at least 3072 bits; a private key "
        "pasted by mistake is refused and not kept.",
        request=SshKeyCreateSerializer,
        responses={201: SshKeySerializer, **error_responses(400, 403, 409)},
    )
    def create(self, request):
        params = SshKeyCreateSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        key = ssh_key_add(tenant=self.tenant, **params.validated_data)
        return Response(SshKeySerializer(key).data, status=status.HTTP_201_CREATED)

    @extend_schema(summary="Remove an SSH key", request=None, responses={204: None, **error_responses(403, 404)})
    def destroy(self, request, pk=None):
        ssh_key_remove(tenant=self.tenant, key=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)
