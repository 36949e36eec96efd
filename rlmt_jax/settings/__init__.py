"""The run configuration: typed sections, YAML files with `key=value` overrides, validation, the resolved
config a run saves."""
