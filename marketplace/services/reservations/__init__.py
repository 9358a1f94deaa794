"""Writes of reservations: their lifecycle (quote, create, cancel, extend, moves), placement on the
fleet, provisioning through the nodes' agents, and releases when a balance runs out."""
