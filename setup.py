"""Build hook: ship the repository's ``schedules/`` and ``experiments/`` TOML files in the wheel.

All metadata lives in ``pyproject.toml``; this file only adds a ``build_py`` that copies

    schedules/*.toml          -> rectdiff/_data/schedules/
    experiments/*.toml        -> rectdiff/_data/experiments/
    experiments/sd/*.toml     -> rectdiff/_data/experiments/sd/

into the build directory (never into ``src/``), where ``rectdiff.io.resources.data_dir`` finds
them. An editable install copies nothing and keeps reading the files at the repository root.
The same files are listed as sources, so an sdist carries them too.
"""

from __future__ import annotations

import os
import shutil
from glob import glob

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py

PACKAGE = "rectdiff"
#: (glob relative to the project root, folder under rectdiff/_data)
SHARED_DATA = (
    ("schedules/*.toml", "schedules"),
    ("experiments/*.toml", "experiments"),
    ("experiments/sd/*.toml", "experiments/sd"),
)


class build_py(_build_py):
    """``build_py`` that also copies the shared TOML files into ``rectdiff/_data``."""

    def _data_root(self) -> str:
        return os.path.join(self.build_lib, PACKAGE, "_data")

    def _shared_data_mapping(self) -> dict[str, str]:
        """``{destination in build_lib: source relative to the project root}``."""
        mapping = {}
        for pattern, folder in SHARED_DATA:
            for source in sorted(glob(pattern)):
                if os.path.isfile(source):
                    target = os.path.join(self._data_root(), folder, os.path.basename(source))
                    mapping[target] = source
        return mapping

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the repository root
            return
        package_src = os.path.abspath(self.get_package_dir(PACKAGE))
        data_root = os.path.abspath(self._data_root())
        if os.path.commonpath([package_src, data_root]) == package_src:
            raise RuntimeError(f"refusing to write packaged data into the source tree: {data_root}")
        if os.path.isdir(data_root):  # drop presets deleted since the last build
            shutil.rmtree(data_root)
        for target, source in self._shared_data_mapping().items():
            self.mkpath(os.path.dirname(target))
            self.copy_file(source, target)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:  # already built from get_output_mapping
            return outputs
        return [*outputs, *self._shared_data_mapping()]

    def get_output_mapping(self) -> dict[str, str]:
        return {**super().get_output_mapping(), **self._shared_data_mapping()}

    def get_source_files(self) -> list[str]:
        return [*super().get_source_files(), *self._shared_data_mapping().values()]


setup(cmdclass={"build_py": build_py})
