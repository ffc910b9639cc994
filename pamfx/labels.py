"""A task's label kind, in one place: class indices [n] or binary attributes [n, k] (multi-label).

Class labels are an integer tensor [n] of indices into the head's C outputs: the loss is cross-entropy and a sample
is right when the largest logit is its class. Attribute labels are a [n, k] tensor of 0/1 (or -1/+1, read as 0/1)
for a head with k outputs, one logit per attribute: the loss is binary cross-entropy with logits, and a sample's
score is the share of its attributes whose logit sign is right (logit > 0 vs label 1), so accuracy is the mean
per-attribute accuracy. Mutual information sees a task's labels as columns: one class column, or k binary ones
(the PAM reference sums the MI over attribute columns).

    task_loss(logits, labels)      # cross-entropy or BCE-with-logits, by the labels' kind
    correct(logits, labels)        # how many samples are right (fractional for attributes)
    label_columns(labels)          # [labels] or [labels[:, 0], ..., labels[:, k-1]]

NOTE: one-hot rows (a [n, k] integer or float tensor whose every row holds one 1 and 0 elsewhere) are ambiguous: k
classes written as one-hot, or k attributes of which each sample happens to have one. pamfx reads them as class
indices, the common case, and says so (LabelKindWarning); a bool tensor [n, k] declares attributes, never read as
classes. For a DataLoader the kind is decided on a task's first batch and later batches must agree.
"""
import torch
import torch.nn.functional as F

from .errors import DataError, LabelKindWarning


def is_multilabel(labels: torch.Tensor) -> bool:
    """Whether `labels` are attribute columns [n, k] rather than class indices [n]."""
    return labels.dim() == 2


def accuracy_name(labels: torch.Tensor) -> str:
    """What accuracy means for these labels, for reports and printouts."""
    return "mean attribute accuracy" if is_multilabel(labels) else "accuracy"


def is_one_hot(labels: torch.Tensor) -> bool:
    """Whether `labels` are one-hot rows [n, k] (k > 1, each row one 1 and 0 elsewhere) not declared as attributes
    by being bool: read as class indices (see the module's note)."""
    if labels.dim() != 2 or labels.shape[1] < 2 or labels.dtype == torch.bool or labels.dtype.is_complex:
        return False
    return bool(((labels == 0) | (labels == 1)).all()) and bool((labels.sum(1) == 1).all())


def one_hot_warning(what: str, width: int) -> LabelKindWarning:
    return LabelKindWarning(
        f"{what}: labels are one-hot rows [n, {width}]; read as the class indices labels.argmax(1) of a {width}-class "
        "task (cross-entropy, top-1 accuracy). If they are attributes (multi-label), pass them as a bool tensor: "
        "labels.bool()")


def canonical(labels: torch.Tensor, what: str, multilabel: bool | None = None) -> torch.Tensor:
    """Labels as pamfx keeps them: class indices [n] as int64, attributes [n, k] as int64 0/1 (-1 becomes 0).
    One-hot rows become class indices (is_one_hot) unless `multilabel` is True: the task's labels were already
    found to be attributes (a DataLoader's earlier batch).

    Raises DataError naming `what` for labels of another shape, class indices that are not integers >= 0,
    attributes not all in {0, 1} or all in {-1, +1}, or attributes where `multilabel` is False (earlier batches
    held class indices or one-hot rows)."""
    if is_one_hot(labels) and not multilabel:
        return labels.argmax(1)
    if multilabel is False and labels.dim() == 2:
        raise DataError(f"{what}: labels hold attribute rows [n, {labels.shape[1]}] (some with several 1s) but this "
                        "task's earlier labels were class indices or one-hot rows; give one kind of label per task")
    if labels.dtype.is_complex or labels.dim() not in (1, 2):
        raise DataError(f"{what}: labels must be class indices [n] (integers) or attributes [n, k] of 0/1 or -1/+1, "
                        f"got {labels.dtype} of shape {tuple(labels.shape)}")
    if not is_multilabel(labels):
        if labels.dtype.is_floating_point:
            raise DataError(f"{what}: labels must be a 1-D integer tensor of class indices, got "
                            f"{labels.dtype} of shape {tuple(labels.shape)}")
        if int(labels.min()) < 0:
            raise DataError(f"{what}: labels must be >= 0, got {int(labels.min())}")
        return labels.long()
    values = set(torch.unique(labels).tolist())
    if not (values <= {0, 1} or values <= {-1, 1}):
        shown = sorted(values)[:6]
        raise DataError(f"{what}: multi-label attributes [n, k] must be all 0/1 or all -1/+1, got values {shown}"
                        + ("..." if len(values) > 6 else ""))
    return (labels > 0).long()


def check_head(labels: torch.Tensor, width: int, what: str, model: str) -> None:
    """Raises DataError naming `what` and `model` when labels do not fit a head of `width` outputs: a class index
    beyond it, or attribute columns k != width."""
    if is_multilabel(labels):
        if labels.shape[1] != width:
            raise DataError(f"{what}: labels hold {labels.shape[1]} attribute columns but model '{model}' has "
                            f"{width} outputs; a multi-label task needs one output per attribute (class indices are a "
                            "1-D tensor [n])")
    elif int(labels.max()) >= width:
        raise DataError(f"{what}: labels span {int(labels.min())}..{int(labels.max())} but model '{model}' has "
                        f"{width} outputs")


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean loss of a batch: cross-entropy for class indices, binary cross-entropy with logits (mean over
    samples and attributes) for attributes."""
    if is_multilabel(labels):
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    return F.cross_entropy(logits, labels)


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """The mean loss of imitating a teacher's logits (knowledge distillation at temperature 1): cross-entropy
    against the teacher's softmax for a class task, binary cross-entropy against its sigmoids for attributes."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, torch.sigmoid(teacher_logits))
    return F.cross_entropy(logits, torch.softmax(teacher_logits, 1))


def correct(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """How many samples of a batch are right: top-1 hits for class indices; for attributes each sample counts the
    share of its attributes whose sign is right, so correct / n is the mean per-attribute accuracy."""
    if is_multilabel(labels):
        return float(((logits > 0) == labels.bool()).double().mean(1).sum())
    return float((logits.argmax(1) == labels).sum())


def label_columns(labels: torch.Tensor) -> list[torch.Tensor]:
    """The label variables mutual information is summed over: [labels] for class indices, the k binary columns
    for attributes."""
    return list(labels.unbind(1)) if is_multilabel(labels) else [labels]
