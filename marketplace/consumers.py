"""The tenant's live feed: reservation states (and later balance and alerts) of the organization the
browser is working in. Joins exactly one group, ``tenant.<organization id>``, of a tenant the user is a
member of; anyone else is refused (4403) before joining anything."""

import json

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from console.events import tenant_group
from console.tenancy import SESSION_KEY
from marketplace.selectors.tenancy import tenant_context_for_user


@database_sync_to_async
def _tenant_for(scope):
    user, session = scope.get("user"), scope.get("session")
    if user is None or not user.is_authenticated:
        return None
    return tenant_context_for_user(user=user, organization_id=session.get(SESSION_KEY) if session else None)


class TenantConsumer(AsyncWebsocketConsumer):
    group: str | None = None

    async def connect(self):
        tenant = await _tenant_for(self.scope)
        if tenant is None:
            await self.close(code=4403)
            return
        self.group = tenant_group(tenant.organization.pk)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code):
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None):
        pass  # the feed is one-way

    async def event_message(self, message):
        await self.send(text_data=json.dumps({"event": message["event"], "data": message["data"]}))
