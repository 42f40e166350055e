"""Files of an ONNX Runtime GenAI artifact folder (shared by export/onnx.py and runtimes/onnx.py)."""
GENAI_CONFIG = "genai_config.json"  # the folder's marker: ORT GenAI reads everything else from it
MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
