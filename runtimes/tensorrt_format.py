"""Files of a TensorRT artifact folder and how to get TensorRT (shared by export/tensorrt.py and
runtimes/tensorrt.py)."""
from nima_edge.errors import NimaError

ENGINE_FILE, CONFIG_FILE = "model.engine", "nima_trt.json"  # the engine is the folder's marker
INSTALL = "pip install tensorrt-cu12 (or tensorrt-cu13; the 'tensorrt' extra) on a machine with an NVIDIA GPU"


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise NimaError("TensorRT is not installed (the tensorrt target needs it)", INSTALL) from e
    return trt
