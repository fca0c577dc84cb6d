import sys

import anemll_fast
from anemll_fast import _native


def test_native_extension_is_built_and_describes_itself():
    info = _native.build_info()
    assert info["abi_version"] == _native.ABI_VERSION >= 1
    assert isinstance(info["compiler"], str) and info["compiler"]
    # The CoreML backend is compiled in on macOS only.
    assert info["coreml_backend"] is (sys.platform == "darwin")


def test_package_exports_and_typing_marker():
    from pathlib import Path

    assert anemll_fast.ModelConfig.__name__ == "ModelConfig"
    assert issubclass(anemll_fast.ConfigError, ValueError)
    assert (Path(anemll_fast.__file__).parent / "py.typed").is_file()
