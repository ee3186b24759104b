"""Files, configs and saved models: everything rectdiff writes or reads, in one place.

files       the only tmp-then-rename writes in the package (text, JSON, bytes, folders)
configs     dataclass-from-mapping with unknown-key errors, TOML reading
model_dir   the saved-model folder format (weights + rectdiff.json)
"""
