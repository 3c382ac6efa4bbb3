"""R2D2 model: towers, cross encoders, heads, EMA teacher. Single-device code (no torch.distributed)."""

from r2d2ds.models.cross_encoder import CrossEncoder, CrossEncoderLayer, MLMHead
from r2d2ds.models.ema import ema_update_, make_teacher
from r2d2ds.models.r2d2 import R2D2, Temperature

__all__ = ["R2D2", "CrossEncoder", "CrossEncoderLayer", "MLMHead", "Temperature", "ema_update_",
           "make_teacher"]
