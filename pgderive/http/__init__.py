"""The daemon's HTTP endpoint: Prometheus metrics, health checks, the status document and page
(ARCHITECTURE.md, "Monitoring"). Started by ``pgderive run`` beside the
:class:`~pgderive.runtime.coordinator.Engine`, which it reads through
:class:`~pgderive.runtime.observed.Observed`."""
