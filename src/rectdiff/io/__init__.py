"""Files, configs and saved models: everything rectdiff writes or reads, in one place.

files       the only tmp-then-rename writes in the package (text, JSON, bytes, folders)
configs     dataclass-from-mapping with unknown-key errors, TOML reading
flags       range checks of the command line's numeric flags
model_dir   the saved-model folder format (weights + rectdiff.json)
"""
