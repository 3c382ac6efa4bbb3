"""Use a trained R2D2 after training: `load(export_dir)` -> R2D2Retriever (encode_image, encode_text, rank).

    from r2d2ds.api import load
    r = load("runs/demo/model")                      # written by r2d2ds.export or the trainer's final export
    img = r.encode_image(["a.jpg", "b.jpg"])          # (2, D) L2-normalised
    txt = r.encode_text(["一只狗在草地上奔跑"])            # (1, D)
    out = r.rank(["a.jpg", "b.jpg"], ["一只狗在草地上奔跑"])  # two-stage scores and orders, as in eval

`rank` runs exactly eval's re-ranking code (`r2d2ds.rerank.rerank` with the model's ITM scorer).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

import r2d2ds  # noqa: F401  (torchvision shim before timm/transformers)
from r2d2ds.config import Config
from r2d2ds.model_dir import build_model, load_model_dir
from r2d2ds.rerank import RerankScore, itm_scorer, rerank

__all__ = ["R2D2Retriever", "build_model", "load"]

ImageInput = Sequence[Image.Image | str | Path] | Tensor


class R2D2Retriever:
    """An R2D2 in eval mode with its tokenizer and eval image transform."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: Config,
                 device: str | torch.device = "cpu") -> None:
        from r2d2ds.data.transforms import image_transform

        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.config = config
        self.transform = image_transform(config.data.image_size, train=False)
        self.batch_size = config.eval.batch_size

    # ----------------------------------------------------------------------------------------------- inputs
    def _pixels(self, images: ImageInput) -> Tensor:
        if isinstance(images, Tensor):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"image tensor must be (B, 3, H, W), already transformed; "
                                 f"got {tuple(images.shape)}")
            return images.float()
        out = []
        for im in images:
            if isinstance(im, (str, Path)):
                if not Path(im).is_file():
                    raise FileNotFoundError(f"image file '{im}' does not exist")
                with Image.open(im) as f:
                    im = f.convert("RGB")
            elif isinstance(im, Image.Image):
                im = im.convert("RGB")
            else:
                raise TypeError(f"images must be PIL images, file paths or a tensor, got {type(im).__name__}")
            out.append(self.transform(im))
        if not out:
            raise ValueError("no images given")
        return torch.stack(out)

    def _tokens(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        if len(texts) == 0:
            raise ValueError("no texts given")
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.config.data.max_text_len, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    # ----------------------------------------------------------------------------------------------- towers
    @torch.no_grad()
    def _encode_images(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        toks, embs = [], []
        for s in range(0, pixels.shape[0], self.batch_size):
            t, e = self.model.encode_image(pixels[s:s + self.batch_size].to(self.device))
            toks.append(t)
            embs.append(e)
        return torch.cat(toks), torch.cat(embs)

    @torch.no_grad()
    def _encode_texts(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        toks, embs = [], []
        for s in range(0, ids.shape[0], self.batch_size):
            t, e = self.model.encode_text(ids[s:s + self.batch_size].to(self.device),
                                          mask[s:s + self.batch_size].to(self.device))
            toks.append(t)
            embs.append(e)
        return torch.cat(toks), torch.cat(embs)

    def encode_image(self, images: ImageInput) -> Tensor:
        """PIL images, file paths, or a transformed float tensor (B, 3, H, W) -> (B, D) L2-normalised fp32."""
        return self._encode_images(self._pixels(images))[1].float()

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """list of T strings -> (T, D) L2-normalised fp32."""
        return self._encode_texts(*self._tokens(texts))[1].float()

    @torch.no_grad()
    def rank(self, images: ImageInput, texts: Sequence[str], topk: int | None = None) -> dict[str, Any]:
        """Two-stage ranking of `images` for every text and of `texts` for every image.

        Returns, with N images and T texts:
          "scores" (T, N): the re-rank score (eval.rerank, r2d2ds.rerank.RerankScore) on each text's top-k
            images, below all of them elsewhere in pre-rank order;
          "order" (T, N): image indices per text, best first (re-ranked top-k, then the rest by sim);
          "similarity" (T, N): the two-tower cosine similarities;
          "image_to_text": {"scores" (N, T), "order" (N, T)}: the same for image queries;
          "topk": the k used (min(topk, candidates) per direction applies).
        """
        k = topk if topk is not None else self.config.eval.topk
        if k < 1:
            raise ValueError(f"topk must be >= 1, got {k}")
        img_tok, img_emb = self._encode_images(self._pixels(images))
        ids, mask = self._tokens(texts)
        txt_tok, txt_emb = self._encode_texts(ids, mask)
        sim = img_emb.float() @ txt_emb.float().t()  # (N, T)
        scorer = itm_scorer(self.model, img_tok, txt_tok, mask.to(self.device), self.batch_size)
        ec = self.config.eval  # the re-rank score the model was evaluated with (weight as calibrated in training)
        score = RerankScore(ec.rerank, ec.rerank_weight, float(self.model.logit_scale()))
        t2i, i2t = rerank(sim, k, scorer, score)
        return {"scores": t2i.scores.cpu(), "order": t2i.order.cpu(), "similarity": sim.t().cpu(),
                "image_to_text": {"scores": i2t.scores.cpu(), "order": i2t.order.cpu()}, "topk": k}


def load(path: str | Path, device: str | torch.device = "cpu") -> R2D2Retriever:
    """Load an export directory written by r2d2ds.export (weights, config.yaml, tokenizer) onto `device`.

    The directory is checked before anything large is allocated (`r2d2ds.model_dir.load_model_dir`): a missing
    file raises FileNotFoundError, a damaged or inconsistent one ModelDirError naming the file and key.
    """
    model, tokenizer, cfg = load_model_dir(path, device)
    return R2D2Retriever(model, tokenizer, cfg, device)
