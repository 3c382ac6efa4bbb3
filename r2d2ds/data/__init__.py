"""Data: webdataset shards (img2dataset layout), tokenizers, timm transforms, and the `prepare` converters.

Public API used by the trainer and eval:
    load_tokenizer(spec, dataset=None)          -> transformers fast tokenizer
    image_transform(image_size, train, augment) -> PIL -> float32 (3, S, S), CLIP mean/std
    resolve_shards(spec, split)                 -> list of shard paths
    TrainStream(cfg, tokenizer, rank, world, seed): endless batches; state_dict / load_state_dict
    load_retrieval_split(spec, split, tokenizer, image_size, max_images=0, max_text_len=32, limits=None)
                                                -> RetrievalSplit
Bad samples: see r2d2ds.data.samples (the skip contract) and r2d2ds.data.tar_reader (limits from tar headers).
"""

from r2d2ds.data.samples import BadSample, DataError, SkipCounter, decode_image, key_to_image_id, parse_sample
from r2d2ds.data.shards import RetrievalSplit, TrainStream, epoch_shards, load_retrieval_split, resolve_shards
from r2d2ds.data.tokenizer import load_tokenizer, write_vocab
from r2d2ds.data.transforms import image_transform

__all__ = [
    "BadSample", "DataError", "RetrievalSplit", "SkipCounter", "TrainStream", "decode_image", "epoch_shards",
    "image_transform", "key_to_image_id", "load_retrieval_split", "load_tokenizer", "parse_sample",
    "resolve_shards", "write_vocab",
]
