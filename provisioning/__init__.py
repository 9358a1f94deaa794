"""Fleet inventory (sites, racks, nodes, GPUs, accelerator types), the node lifecycle, and — in later
issues — commands to agents, Celery tasks and telemetry. Never imports `marketplace`.
`provisioning/agent/` is the node agent and imports nothing of the project."""
