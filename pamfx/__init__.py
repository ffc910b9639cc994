"""pamfx: N single-task PyTorch models -> one task-gated multitask network (Pruning-Aware Merging as a compiler).

    result = pamfx.optimize({"tops": tops_model, "shoes": shoes_model}, data, merge="none", prune=None)
    result.model(x, tasks=["tops"])          # {"tops": logits}, computing only what "tops" needs
    pamfx.codegen(result.model, "out/merged.py")
"""
from .api import Result, optimize
from .passes.finetune import FinetuneConfig
from .passes.merge_mtz import MtzConfig
from .passes.merge_pam import PamConfig
from .passes.prune import PruneConfig
from .codegen import codegen
from .errors import (AlignmentError, AugmentedDataWarning, DataError, DatasetMissingError, DeviceError,
                     GroupingError, LabelKindWarning, PamfxError, PamfxWarning, ToleranceWarning, TraceError,
                     UnsupportedOpError)
from .history import History, MergeTrial, OwnNetwork, Step, ZipChoice
from .network import GatedNetwork

__all__ = ["optimize", "codegen", "Result", "PamConfig", "MtzConfig", "FinetuneConfig", "PruneConfig", "GatedNetwork",
           "PamfxError", "PamfxWarning", "TraceError", "AlignmentError", "UnsupportedOpError", "GroupingError",
           "DataError", "DatasetMissingError", "DeviceError", "AugmentedDataWarning", "LabelKindWarning",
           "ToleranceWarning", "History", "MergeTrial", "OwnNetwork", "Step", "ZipChoice"]
__version__ = "0.1.0"
