"""Sinks: where derived views are written. One module per sink behind :class:`sinks.base.Sink`."""
