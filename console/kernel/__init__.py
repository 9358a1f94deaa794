"""The kernel: what every app builds on, importing no app of its own (ARCHITECTURE, Layers): the one
error type hierarchy and JSON shape (``errors``), events to browsers (``events``), lifecycle moves
(``lifecycle``), tokens (``tokens``), task helpers (``tasks``), settings helpers (``env``), the feed
consumers' base (``consumers``), rate limits (``throttling``), CLI progress (``progress``), the
admin's write path through services (``admin``) and its columns (``admin_columns``), and the REST
API's shared pieces (``api``). `make lint` holds it to that."""
