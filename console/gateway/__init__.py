"""The inference gateway: OpenAI's API for every tenant's endpoints (console.gateway.app, docs/gateway.md)."""
