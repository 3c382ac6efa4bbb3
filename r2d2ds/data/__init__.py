"""Data: webdataset shards (img2dataset layout), tokenizers, timm transforms, and the `prepare` converters.

Public API used by the trainer and eval:
    load_tokenizer(spec, dataset=None)          -> transformers fast tokenizer
    image_transform(image_size, train, augment) -> PIL -> float32 (3, S, S), CLIP mean/std
    resolve_shards(spec, split)                 -> list of shard paths
    TrainStream(cfg, tokenizer, rank, world, seed): endless batches; state_dict / load_state_dict
    load_retrieval_split(spec, split, tokenizer, image_size, max_images=0, max_text_len=32) -> RetrievalSplit
"""

from r2d2ds.data.shards import (
    BadSample,
    RetrievalSplit,
    SkipCounter,
    TrainStream,
    epoch_shards,
    key_to_image_id,
    load_retrieval_split,
    parse_sample,
    resolve_shards,
)
from r2d2ds.data.tokenizer import load_tokenizer, write_vocab
from r2d2ds.data.transforms import decode_image, image_transform

__all__ = [
    "BadSample", "RetrievalSplit", "SkipCounter", "TrainStream", "decode_image", "epoch_shards",
    "image_transform", "key_to_image_id", "load_retrieval_split", "load_tokenizer", "parse_sample",
    "resolve_shards", "write_vocab",
]
