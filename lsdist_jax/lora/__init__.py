"""The LLM as its own length predictor (Sequence Scheduling): instruction data from a length
store, LoRA training (optax, orbax), the export and the `lora` predictor kind."""
