"""R2D2 pre-training losses (GCPR, TgD, FGR, FgD, MLM) and the objective module the engine wraps."""

from r2d2ds.losses.contrastive import gcpr_loss, tgd_loss
from r2d2ds.losses.distill import fgd_loss
from r2d2ds.losses.fgr import build_itm_pairs, fgr_loss, pick_negatives, weighted_itm_loss
from r2d2ds.losses.mlm import mask_tokens, mlm_loss
from r2d2ds.losses.objective import R2D2Pretraining

__all__ = ["R2D2Pretraining", "build_itm_pairs", "fgd_loss", "fgr_loss", "gcpr_loss", "mask_tokens",
           "mlm_loss", "pick_negatives", "tgd_loss", "weighted_itm_loss"]
