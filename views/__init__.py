"""What a view is: the YAML spec, key templates, `where`, derivations (row → Ops), include and
aggregate definitions, and the checks that bind views to the source catalog."""
