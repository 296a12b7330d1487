"""GGUF export: a Qwen (v1) checkpoint as llama.cpp's `qwen` architecture, for llama.cpp and Ollama.

One job per module: `tensors` (names, layout, storage types), `vocab` (the BPE vocabulary llama.cpp
reads), `chat_template` (the template as every GGUF reader renders it), `metadata` (hyper-parameters,
tokenizer, sampling defaults), `weights` (where the tensors come from), `writer` (the file),
`modelfile` (Ollama), `verify` (the file checked in llama.cpp), `packages` (optional imports) and
`export` (the command, `export_gguf.py`).
"""
