"""The ChatML conversation format of Qwen chat models: what every prompt, template and data encoder shares.

A flat module without imports, copied next to checkpoints with the model files.
"""

# The system turn used when a conversation brings none (as in the released chat models).
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
