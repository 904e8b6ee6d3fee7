"""The translator: model shapes and loss (`modeling`), training data (`data`), readout and calibration
(`readout`), the user API (`api`), AnnData input/output (`anndata_io`), model card and Hub push (`card`, `hub`)."""

from .api import CellTranslator, translate
from .modeling import MODEL_SHAPES, constrained_decode, make_config, make_model, restricted_lm_loss

__all__ = ["CellTranslator", "translate", "MODEL_SHAPES", "constrained_decode", "make_config", "make_model", "restricted_lm_loss"]
