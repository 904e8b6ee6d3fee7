"""The translator: model shapes and the profile head (`model`), loss (`loss`), decoding (`decode`), training data (`data`), readout and calibration
(`readout`), the user API (`api`), AnnData input/output (`anndata_io`), model card and Hub push (`card`, `hub`)."""

from .api import CellTranslator, translate
from .decode import constrained_decode
from .loss import restricted_lm_loss
from .model import MODEL_SHAPES, make_config, make_model

__all__ = ["CellTranslator", "translate", "MODEL_SHAPES", "constrained_decode", "make_config", "make_model", "restricted_lm_loss"]
