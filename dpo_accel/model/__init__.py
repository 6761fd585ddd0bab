"""Models: loading (HF folder, hub id, GGUF), LoRA / QLoRA, attention functions, the log-prob module (prefix
sharing, the lean LM head, the start-up self-check), reference strategies, speed options, placement across
processes. Imports the configuration, data and outputs floors; never a loop, evaluation or an objective."""
