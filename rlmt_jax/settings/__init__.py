"""The run configuration: typed sections, YAML files with `key=value` overrides, validation, the resolved
config a run saves.

    config      reading, overriding, resolving and saving configs; imports every name below, the one to import
    sections    the section dataclasses and RunConfig, each section checking its own fields
    rules       validate: the sections' checks, the rules across sections, the algorithm's, in one order
    builtins    `builtin:NAME` paths (the tiny default's models and data)
    schema      typed dataclasses from nested dicts, errors naming the dotted key
"""
