"""The model server of inference endpoints (docs/serving.md): one replica of an embedding model behind
the part of OpenAI's HTTP API that embeddings use, started by the agent's process driver on a GPU
slice (``params.serve``, docs/agent-protocol.md) and reached only through the console's gateway.

Its modules need the ``serving`` extra (torch, sentence-transformers, the demo model's package); this
one does not, so the agent, which reads the names below, still installs and runs without the extra.
"""

# Names, not secrets (noqa S105). The agent puts the replica's secret in the first, never on the command
# line; the gateway sends it in the second on every request but the health route's.
SECRET_ENV = "NEOCLOUD_REPLICA_SECRET"  # noqa: S105
SECRET_HEADER = "X-Neocloud-Replica-Secret"  # noqa: S105
