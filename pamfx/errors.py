"""The error classes of pamfx. Bad arguments raise ValueError/TypeError; everything else a PamfxError."""


class PamfxError(Exception):
    """Base class of the errors pamfx raises about models, graphs and data."""


class TraceError(PamfxError):
    """A model cannot be traced by torch.fx."""


class AlignmentError(PamfxError):
    """Two models do not share one topology."""


class UnsupportedOpError(PamfxError):
    """The graph holds an op pamfx has no channel rule for."""


class GroupingError(PamfxError):
    """A grouping breaks the rules of the task-gated network (docs/design.md section 2)."""


class DataError(PamfxError, ValueError):
    """Task data is missing, empty, mismatched or not finite."""


class DeviceError(PamfxError, ValueError):
    """A device that torch does not know or this machine lacks, or models that are not on one usable device."""


class DatasetMissingError(PamfxError, FileNotFoundError):
    """A dataset's files are not on disk."""


class PamfxWarning(UserWarning):
    """A result the user must know about: a task below its accuracy floor, a combination dearer than the originals."""


class AugmentedDataWarning(PamfxWarning):
    """The guard data changes from one read to the next (a Dataset that augments at random)."""


class LabelKindWarning(PamfxWarning):
    """Labels whose kind pamfx had to choose: one-hot rows read as class labels."""


class ToleranceWarning(PamfxWarning):
    """A tolerance so large that it is probably not the fraction meant (1.0 lets a task lose everything)."""
