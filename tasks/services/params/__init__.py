"""params.yaml: loading and validating it, editing it in place, overrides, profiles, committed params."""
