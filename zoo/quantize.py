"""TEMP(merge): remove after the CLI move. zoo/bench.py still imports these four names from here.

Their homes: `zoo.artifacts` (ONNX and int8 ONNX files) and `zoo.precision` (the quality checks).
"""

from zoo.artifacts import int8_onnx_path, onnx_path  # noqa: F401
from zoo.precision import check_precision, describe  # noqa: F401
