"""Files of an ExecuTorch artifact folder (shared by export/executorch.py and runtimes/executorch.py)."""
PTE_NAME = "model.pte"  # the folder's marker; tokenizer.json and tokenizer_config.json sit beside it
