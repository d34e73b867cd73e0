"""Views: YAML spec, derivations, the engine loop and the CLI."""
