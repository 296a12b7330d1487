"""Writing the GGUF file: metadata and the table of tensors first, then each tensor as it is loaded.

The gguf package's writer is driven in its streaming mode (tensor infos declared up front, data
written one tensor at a time), so no more than one converted tensor is held in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .metadata import SamplingDefaults, add_model_parameters, add_sampling_defaults, add_tokenizer
from .tensors import OutType, encode_tensor, gguf_tensor_name, stored_byte_shape, tensor_type
from .vocab import GGUFVocabulary
from .weights import SourceTensor


def write_gguf(
    path: Path,
    *,
    config: Any,
    name: str,
    outtype: OutType,
    vocabulary: GGUFVocabulary,
    chat_template: str,
    sampling: SamplingDefaults,
    tensors: Sequence[SourceTensor],
) -> None:
    import gguf
    import numpy as np
    from tqdm import tqdm

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN])
    add_model_parameters(writer, config, name, outtype)
    add_tokenizer(writer, vocabulary, chat_template)
    add_sampling_defaults(writer, sampling)
    plan = []
    for source in tensors:
        gguf_name = gguf_tensor_name(source.name)
        qtype = tensor_type(gguf_name, source.shape, outtype)
        byte_shape = stored_byte_shape(source.shape, qtype)
        nbytes = int(np.prod(byte_shape))
        writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        plan.append((source, qtype, nbytes))
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = sum(nbytes for _, _, nbytes in plan)
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="writing GGUF") as progress:
            for source, qtype, nbytes in plan:
                writer.write_tensor_data(encode_tensor(source.load(), qtype))
                progress.update(nbytes)
    finally:
        writer.close()
