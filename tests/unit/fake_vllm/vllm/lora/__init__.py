"""Stand-in for ``vllm.lora`` (see ../README.md): NOT vLLM."""
