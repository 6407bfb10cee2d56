"""LoRA adapters: many fine-tunes behind one base vLLM engine, loaded when asked for."""
