"""Writes of tenancy: people, organizations and memberships, API keys."""
