"""The R2D2 pre-training objective: the module DeepSpeed's engine wraps.

Everything (towers, teacher pass, cross encoders, every loss) runs inside `R2D2Pretraining.forward`, so
ZeRO-3's per-module parameter gathering sees every use. Weights (LossConfig):

  total = (1 - a) * gcpr_weight * gcpr + a * tgd_weight * tgd + fgr_weight * fgr + fgd_weight * fgd
          + mlm_weight * mlm
  with a = tgd_alpha when TgD runs (a teacher is given, tgd_alpha > 0, tgd_weight > 0), else a = 0.

A term whose weight is 0 (or that needs a missing teacher) is not computed and logged as 0. The student's
masked-text pass is shared by MLM and FgD.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from r2d2ds.config import LossConfig, ModelConfig
from r2d2ds.losses.contrastive import gcpr_loss, tgd_loss
from r2d2ds.losses.distill import fgd_loss
from r2d2ds.losses.fgr import fgr_group, fgr_loss
from r2d2ds.losses.mlm import IGNORE_INDEX, mask_tokens, mlm_loss
from r2d2ds.losses.negatives import NegativeSampling
from r2d2ds.models.r2d2 import R2D2

TERMS = ("gcpr", "tgd", "fgr", "fgd", "mlm")


class R2D2Pretraining(nn.Module):
    def __init__(self, model_cfg: ModelConfig, loss_cfg: LossConfig, vocab_size: int, pad_token_id: int,
                 mask_token_id: int, special_token_ids: list[int]) -> None:
        super().__init__()
        self.model = R2D2(model_cfg, vocab_size, pad_token_id)
        self.model_cfg = model_cfg
        self.loss_cfg = loss_cfg
        self.vocab_size = vocab_size
        self.mask_token_id = mask_token_id
        # Pad is never a target either (also excluded through the attention mask).
        self.special_token_ids = sorted(set(special_token_ids) | {pad_token_id})
        self.sampling = NegativeSampling.from_loss_config(loss_cfg)
        self._freeze_unused()

    def _freeze_unused(self) -> None:
        """Parts that no active term reaches get requires_grad=False, so they stay out of the optimizer and of the
        gradient reduction (a contrastive-only run would otherwise reduce and Adam-step ~3 M zero gradients of the
        cross encoders and the 21k-vocabulary MLM decoder every step, and weight decay would shrink them). They
        keep their initial values and stay in the state dict, eval and the export."""
        lc, m = self.loss_cfg, self.model
        text_query = lc.fgr_weight > 0 or lc.mlm_weight > 0 or lc.fgd_weight > 0
        contrastive = lc.gcpr_weight > 0 or self._tgd_on()
        unused = {"image_proj": not contrastive, "text_proj": not contrastive, "temperature": not contrastive,
                  "text_query_encoder": not text_query, "image_to_cross": not text_query,
                  "image_query_encoder": lc.fgr_weight == 0, "itm_text_query": lc.fgr_weight == 0,
                  "itm_image_query": lc.fgr_weight == 0, "mlm_head": lc.mlm_weight == 0}
        for name, off in unused.items():
            if off:
                getattr(m, name).requires_grad_(False)

    def _tgd_on(self) -> bool:
        return self.loss_cfg.tgd_alpha > 0 and self.loss_cfg.tgd_weight > 0

    def uses_teacher(self) -> bool:
        """Whether any term (TgD, FgD) needs the EMA teacher: the trainer builds one only then."""
        return self._tgd_on() or self.loss_cfg.fgd_weight > 0

    def teacher_image(self, teacher: R2D2, image: Tensor, tokens: Tensor,
                      pooled: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The teacher's image tokens and embedding for `image`, whose student image-tower output is `tokens`
        (and `pooled`). A frozen image tower is the same module in student and teacher (frozen weights never drift
        under the EMA), so its output is reused, detached, and only the teacher's own projection runs; the
        embedding is None there when `pooled` is not given. Otherwise the teacher's tower runs. Call under
        no_grad. The one-shot objective and GradCache's passes all take the teacher's image side from here."""
        if self.model_cfg.image_freeze:
            return tokens.detach(), (teacher.image_proj(pooled.detach()) if pooled is not None else None)
        return teacher.encode_image(image)

    def fgr_draw(self, seed: int) -> tuple[int, bool]:
        """(FGR's sampling seed: its own stream of the step seed, whether the draw is fused into GCPR).

        The released softmax draw at the learned temperature comes out of the GCPR pass itself (one pass over
        the global similarity matrix instead of two); other strategies sample in FGR. GradCache's embedding
        pass follows the same rule, so both draw the same negatives."""
        lc = self.loss_cfg
        fuse = (lc.fgr_weight > 0 and lc.gcpr_weight > 0 and self.sampling.uses_kernel()
                and self.sampling.temperature == 0 and lc.fgr_negative_scope == "global"
                and self.model_cfg.contrastive_impl != "reference")
        return (int(seed) * 0x2545F491 + 0x1F) % (1 << 62), fuse

    def forward(self, batch: dict, teacher: R2D2 | None, seed: int, run: Callable | None = None) -> Any:
        """The loss terms of `batch`. `run(self, batch, teacher, seed)`, when given, replaces the one-shot
        objective (GradCache's passes, r2d2ds.losses.gradcache) so it, too, runs inside the engine's forward."""
        if run is not None:
            return run(self, batch, teacher, seed)
        lc, impl = self.loss_cfg, self.model_cfg.contrastive_impl
        model = self.model
        image, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        labels = batch.get("image_id")
        gen = torch.Generator(device=ids.device).manual_seed(int(seed))

        use_tgd = teacher is not None and self._tgd_on()
        use_fgd = teacher is not None and lc.fgd_weight > 0
        use_mlm = lc.mlm_weight > 0
        a = lc.tgd_alpha if use_tgd else 0.0

        img_tokens, img_emb, img_pooled = model.encode_image(image, with_pooled=True,  # (B, N, Wi), (B, D), (B, P)
                                                             cache_keys=labels)
        txt_tokens, txt_emb = model.encode_text(ids, mask)  # (B, L, Wt), (B, D)
        scale = model.logit_scale()  # 0-dim fp32

        zero = scale.new_zeros(())
        terms = dict.fromkeys(TERMS, zero)
        fgr_stats = {"acc/itm": zero}
        use_fgr = lc.fgr_weight > 0
        fgr_seed, fuse_draw = self.fgr_draw(seed)
        negatives = None

        if use_tgd or use_fgd:
            with torch.no_grad():  # teacher in eval mode, no gradient
                t_img_tokens, t_img_emb = self.teacher_image(teacher, image, img_tokens, img_pooled)
                t_txt_tokens, t_txt_emb = teacher.encode_text(ids, mask)

        if lc.gcpr_weight > 0:
            if fuse_draw:
                terms["gcpr"], negatives = gcpr_loss(img_emb, txt_emb, scale, labels, impl=impl,
                                                     negatives_seed=fgr_seed)
            else:
                terms["gcpr"] = gcpr_loss(img_emb, txt_emb, scale, labels, impl=impl)
        if use_tgd:
            terms["tgd"] = tgd_loss(img_emb, txt_emb, scale, labels, t_img_emb, t_txt_emb, impl=impl)

        if use_mlm or use_fgd:
            # Masking before negative sampling: the generator's draws are in a fixed order (reproducible).
            masked_ids, mlm_labels = mask_tokens(ids, mask, lc.mlm_probability, self.mask_token_id,
                                                 self.vocab_size, self.special_token_ids, gen)
            m_txt_tokens, _ = model.encode_text(masked_ids, mask)
            m_hidden = model.text_query(m_txt_tokens, mask, img_tokens)  # (B, L, W)
            if use_mlm:
                sel = mlm_labels != IGNORE_INDEX  # (B, L)
                # Decode only the masked positions (~15%): saves the (B, L, vocab) logits. Boolean indexing is
                # a host sync (nonzero), once per step.
                terms["mlm"] = mlm_loss(model.mlm_logits(m_hidden[sel]), mlm_labels[sel])
            if use_fgd:
                with torch.no_grad():
                    t_hidden = teacher.text_query(t_txt_tokens, mask, t_img_tokens)  # full text
                terms["fgd"] = fgd_loss(m_hidden, t_hidden, mask)

        if use_fgr:  # collective (negatives' token exchange): every rank runs it, with or without requests
            terms["fgr"], fgr_stats = fgr_loss(model, img_tokens, txt_tokens, mask, img_emb, txt_emb, scale, labels,
                                               fgr_seed, lc.fgr_class_weights, self.sampling,
                                               group=fgr_group(lc.fgr_negative_scope), negatives=negatives,
                                               impl=impl)

        total = ((1.0 - a) * lc.gcpr_weight * terms["gcpr"] + a * lc.tgd_weight * terms["tgd"]
                 + lc.fgr_weight * terms["fgr"] + lc.fgd_weight * terms["fgd"] + lc.mlm_weight * terms["mlm"])
        out = {"loss": total.float()}
        out.update({f"loss/{k}": v.detach().float() for k, v in terms.items()})
        out.update(fgr_stats)
        out["logit_scale"] = scale.detach().float()
        return out
